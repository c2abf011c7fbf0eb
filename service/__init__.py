"""Image-classifier prediction service and the preprocessing it shares with training."""

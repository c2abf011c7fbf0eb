"""Image-classifier training job."""

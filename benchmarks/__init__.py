"""Benchmarks of the service and the training pipeline."""

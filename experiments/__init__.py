"""Experiments: ml_collections configs and the training entry point."""

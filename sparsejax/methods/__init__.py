"""One module per sparse-training method."""

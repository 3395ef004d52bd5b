"""Training on Ray Train: the worker loop with negatives gathered from the global batch, and the gradient cache."""

"""MLflow at the edge: runs and metrics, the pyfunc model, model URIs and the champion registry."""

"""The SamToNe paper's embedding-space analyses: pure computations and the report that runs them on models."""

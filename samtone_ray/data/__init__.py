"""Retrieval data: BEIR splits and Parquet pairs read from disk, the pair table and deterministic batches."""

"""Retrieval evaluation: trec_eval-compatible metrics, exact top-k search, BM25, statistics and per-query files."""

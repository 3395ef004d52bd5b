"""Hard-negative mining: retrieve candidates for each training query (BM25 or a dense model),
keep the positive-aware ones (``filters``), write training pairs with a ``negatives`` column."""

"""Fixed random subsets of ids: which queries and documents an evaluation or an analysis looks at.

Pure numpy. A draw depends on the set of ids and the generator, never on the order the ids came
in, so every run that loads the same data with the same seed looks at the same documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_ids(ids: Sequence[str], size: int, rng: np.random.Generator) -> list[str]:
    """A random order of ``ids`` (sorted first, so the draw depends on the set, not its order),
    cut to ``size`` (0 = all)."""
    ordered = sorted(ids)
    order = rng.permutation(len(ordered))
    if size:
        order = order[:size]
    return [ordered[i] for i in order]


def bound_corpus(doc_ids: Sequence[str], required: set[str], max_docs: int, rng: np.random.Generator) -> list[str]:
    """The searched corpus: every ``required`` document, plus a fixed random sample of the rest
    up to ``max_docs`` in all (0 = the whole corpus). Returned in ``doc_ids`` order."""
    missing = required.difference(doc_ids)
    if missing:
        raise ValueError(f"{len(missing)} required documents are not in the corpus, e.g. {sorted(missing)[:5]}")
    if not max_docs or max_docs >= len(doc_ids):
        return list(doc_ids)
    room = max_docs - len(required)
    rest = [did for did in doc_ids if did not in required]
    keep = required | (set(sample_ids(rest, room, rng)) if room > 0 else set())
    return [did for did in doc_ids if did in keep]

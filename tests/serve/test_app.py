"""samtone serve against a real Ray Serve app on 127.0.0.1: the openai client, /search, bad input,
readiness and the alias hot swap under load. One app for the whole module (start ~4 s); the hot
swap test moves the alias, so it runs last."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from procs import listeners

from samtone_ray.core.runtime import free_loopback_port
from samtone_ray.serve.api import ApiError, Limits, parse_embeddings

DOCS = [
    ("d1", "Mounting", "how to mount a usb disk on debian"),
    ("d2", "Network", "configure a static ip address with netplan"),
    ("d3", "Packages", "install a deb package with apt and dpkg"),
    ("d4", "Kernel", "compile a custom linux kernel from source"),
    ("d5", "", "reset a forgotten root password in grub"),
    ("d6", "Audio", "fix no sound output with pulseaudio"),
]
LIMITS = {"max_inputs": 8, "max_input_chars": 500, "max_body_bytes": 20_000, "max_top_k": 5}


def _post(url: str, payload, headers: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """A real SQLite registry: v1 = the tiny shared-tower BERT, v2 = separate towers (other weights)."""
    from samtone_ray.tracking import runs as tracking
    from samtone_ray.model.towers import DualEncoder

    root = tmp_path_factory.mktemp("registry")
    v2_dir = root / "v2"
    torch.manual_seed(1)
    v2 = DualEncoder.from_base(tiny_model_dir, tower_mode="separate", query_max_length=16, doc_max_length=64)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    v2.save_pretrained(v2_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_registered_model("tiny")
    c.create_model_version("tiny", source=str(tiny_model_dir))
    c.create_model_version("tiny", source=str(v2_dir))
    c.set_registered_model_alias("tiny", "champion", "1")
    return {"uri": uri, "dirs": {"1": tiny_model_dir, "2": v2_dir}, "client": c}


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in DOCS))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": x}) + "\n" for i, (_, _, x) in enumerate(DOCS)))
    (root / "qrels").mkdir()
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d}\t1\n" for i, (d, _, _) in enumerate(DOCS)))
    return root


@pytest.fixture(scope="module")
def server(ray_cluster, registry, beir_dir):
    from ray import serve

    from samtone_ray.core.config import ServeConfig
    from samtone_ray.serve.app import build_app, deployment_options

    port = free_loopback_port()
    cfg = ServeConfig(max_batch_size=16, max_ongoing_requests=64, poll_interval_s=0.5, **LIMITS)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {"model": "models:/tiny@champion", "tracking_uri": registry["uri"], "index": str(beir_dir)},
        deployment_options(1, serve_cfg=cfg),
    )
    serve.run(app, name="samtone-test", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    seen = []  # /readyz answers until the first 200, plus /v1/embeddings answers while loading
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, body = _get(f"{url}/readyz")
        seen.append((status, body))
        if status == 200:
            break
        seen.append(_post(f"{url}/v1/embeddings", {"model": "tiny", "input": "x"})[:2] + (None,))
        time.sleep(0.05)
    yield {"url": url, "readiness": seen}
    serve.shutdown()


def _model(registry, version):
    from samtone_ray.model.towers import DualEncoder

    return DualEncoder.from_pretrained(registry["dirs"][version])


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0, timeout=60)


def test_ready_only_after_load_and_warm_up(server):
    *before, (status, body) = [s for s in server["readiness"] if s[0] is not None]
    assert status == 200 and body["version"] == "1"
    for s in before:  # anything answered before readiness is a clean 503 "loading", never a 500
        assert s[0] == 503 and s[1]["error"]["code"] == "model_loading", s
    assert _get(f"{server['url']}/healthz") == (200, {"status": "ok"})


def test_openai_client_default_base64_float_and_lists(server, registry):
    model = _model(registry, "1")
    texts = ["how do I mount a disk", "static ip on debian", "x " * 240]  # the last: 240 tokens, 480 chars
    client = _client(server)
    default = client.embeddings.create(model="tiny", input=texts[0])  # the client asks for base64
    flt = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    queries = client.embeddings.create(model="tiny", input=texts, extra_body={"input_type": "query"})
    want_docs, want_queries = model.encode_documents(texts), model.encode_queries(texts)
    np.testing.assert_allclose(default.data[0].embedding, want_docs[0].numpy(), atol=1e-5)
    np.testing.assert_allclose([d.embedding for d in flt.data], want_docs.numpy(), atol=1e-5)
    np.testing.assert_allclose([d.embedding for d in queries.data], want_queries.numpy(), atol=1e-5)
    assert [d.index for d in flt.data] == [0, 1, 2] and flt.model == "tiny"
    # usage: real token counts, truncated at the tower's max length (the long text hits it)
    want_tokens = [len(model.tokenizer(t, truncation=True, max_length=model.doc_max_length)["input_ids"]) for t in texts]
    assert want_tokens[2] == model.doc_max_length
    assert flt.usage.prompt_tokens == flt.usage.total_tokens == sum(want_tokens)


def test_raw_base64_is_little_endian_float32(server, registry):
    status, body, _ = _post(f"{server['url']}/v1/embeddings", {"model": "tiny", "input": ["abc"], "encoding_format": "base64"})
    assert status == 200 and body["model_version"] == "1"
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, _model(registry, "1").encode_documents(["abc"])[0].numpy(), atol=1e-5)


def test_models_lists_version_and_limits(server):
    status, body = _get(f"{server['url']}/v1/models")
    assert status == 200
    (entry,) = body["data"]
    assert entry["id"] == "tiny" and entry["version"] == "1" and entry["dimensions"] == 32
    assert body["limits"] == LIMITS
    assert _get(f"{server['url']}/openapi.json")[0] == 200


def test_search_ranks_like_exact_evaluation(server, registry):
    from samtone_ray.evaluation.retrieval import exact_search

    model = _model(registry, "1")
    queries = [x for _, _, x in DOCS]
    docs = [f"{t} {x}" if t else x for _, t, x in DOCS]
    scores, rows = exact_search(model.encode_queries(queries), model.encode_documents(docs), 3)
    status, body, _ = _post(f"{server['url']}/search", {"queries": queries, "top_k": 3})
    assert status == 200 and body["model_version"] == "1"
    agree = 0
    for i, result in enumerate(body["data"]):
        assert [h["id"] for h in result["hits"]] == [DOCS[r][0] for r in rows[i].tolist()]
        np.testing.assert_allclose([h["score"] for h in result["hits"]], scores[i].numpy(), atol=1e-5)
        agree += rows[i, 0].item() == i and result["hits"][0]["id"] == DOCS[i][0]
    assert agree > 0  # the relevant document is first wherever exact search puts it first
    status, body, _ = _post(f"{server['url']}/search", {"query": queries[0], "top_k": 1})
    assert status == 200 and body["data"][0]["hits"][0]["title"] == "Mounting"


BAD = [  # (route, payload or raw bytes, extra headers, status, param)
    ("/v1/embeddings", {"model": "tiny", "input": ""}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": []}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": ["ok", 3]}, {}, 422, "input[1]"),
    ("/v1/embeddings", {"model": "tiny", "input": [101, 2023, 102]}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": [[101, 102]]}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "gpt-4", "input": "x"}, {}, 404, "model"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "encoding_format": "int8"}, {}, 422, "encoding_format"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "dimensions": 16}, {}, 422, "dimensions"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "input_type": "passage"}, {}, 422, "input_type"),
    ("/v1/embeddings", {"model": "tiny", "input": ["x"] * 9}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": "x" * 501}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": ["y" * 400] * 60}, {}, 413, None),
    ("/v1/embeddings", b'{"model": "tiny", "input": ', {}, 400, None),
    ("/v1/embeddings", b"[1, 2]", {}, 422, None),
    ("/v1/embeddings", b"model=tiny&input=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    ("/search", {"query": "disk", "top_k": 0}, {}, 422, "top_k"),
    ("/search", {"query": "disk", "top_k": -3}, {}, 422, "top_k"),
    ("/search", {"query": "disk", "top_k": 6}, {}, 422, "top_k"),
    ("/search", {"query": "disk", "top_k": "3"}, {}, 422, "top_k"),
    ("/search", {"queries": ["a"] * 9}, {}, 422, "queries"),
    ("/search", {"query": "disk", "queries": ["disk"]}, {}, 422, "query"),
    ("/search", {"text": "disk"}, {}, 422, "text"),
    ("/nowhere", {}, {}, 404, None),
]


@pytest.mark.parametrize("route,payload,headers,status,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_openai_error_and_the_server_keeps_serving(server, route, payload, headers, status, param):
    raw = payload if isinstance(payload, bytes) else None
    got, body, _ = _post(server["url"] + route, payload, headers, raw)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert body["error"]["param"] == param
    ok, _, _ = _post(f"{server['url']}/v1/embeddings", {"model": "tiny", "input": "still here"})
    assert ok == 200


def test_openai_client_raises_readable_errors(server):
    import openai

    with pytest.raises(openai.UnprocessableEntityError, match="not trained for shortened"):
        _client(server).embeddings.create(model="tiny", input="x", dimensions=8)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        _client(server).embeddings.create(model="other", input="x")


def test_wrong_dimension_message_names_the_reason():
    limits = Limits(**LIMITS)
    with pytest.raises(ApiError, match="not trained for shortened") as exc:
        parse_embeddings({"model": "m", "input": "x", "dimensions": 64}, limits, {"m"}, 384)
    assert exc.value.status == 422 and exc.value.param == "dimensions"
    assert parse_embeddings({"model": "m", "input": "x", "dimensions": 384}, limits, {"m"}, 384).texts == ["x"]


def test_alias_hot_swap_under_load(server, registry):
    """Move @champion from v1 to v2 (other weights, separate towers) while clients send requests:
    no request fails, versions change from 1 to 2, each response matches the version it names,
    and /search never pairs a query encoder with another version's index."""
    url = server["url"]
    texts = ["swap test text", "another one"]
    want = {v: _model(registry, v).encode_documents(texts).numpy() for v in ("1", "2")}
    results, failures, lock = [], [], threading.Lock()
    stop = threading.Event()

    def client(n):
        for _ in range(n):
            if stop.is_set():
                return
            status, body, _ = _post(f"{url}/v1/embeddings", {"model": "tiny", "input": texts, "encoding_format": "float"})
            with lock:
                (results if status == 200 else failures).append((status, body))

    threads = [threading.Thread(target=client, args=(150,)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    registry["client"].set_registered_model_alias("tiny", "champion", "2")
    deadline = time.monotonic() + 60
    search_answers = []
    while time.monotonic() < deadline and not any(b["model_version"] == "2" for _, b in list(results)):
        search_answers.append(_post(f"{url}/search", {"query": texts[0], "top_k": 2})[:2])
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    versions = [b["model_version"] for _, b in results]
    print(f"hot swap: {len(results) + len(failures)} requests, {len(failures)} failed, versions seen {sorted(set(versions))}")
    assert not failures, failures[:3]
    assert versions[0] == "1" and "2" in versions
    for _, body in results:
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], want[body["model_version"]], atol=1e-5)
    # /search moves to v2 once v2 has re-encoded the corpus, and each answer is one version's pair
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _get(f"{url}/info")[1]["search_version"] != "2":
        time.sleep(0.2)
    search_answers.append(_post(f"{url}/search", {"query": texts[0], "top_k": 2})[:2])
    assert search_answers[-1][1]["model_version"] == "2"
    for status, body in search_answers:
        assert status == 200
        model = _model(registry, body["model_version"])
        docs = {d: f"{t} {x}" if t else x for d, t, x in DOCS}
        hits = body["data"][0]["hits"]
        want_scores = model.encode_documents([docs[h["id"]] for h in hits]) @ model.encode_queries([texts[0]])[0]
        np.testing.assert_allclose([h["score"] for h in hits], want_scores.numpy(), atol=1e-5)
    status, body = _get(f"{url}/v1/models")
    assert body["data"][0]["version"] == "2" and body["data"][0]["tower_mode"] == "separate"
    client = _client(server)
    q = client.embeddings.create(model="tiny", input=texts, extra_body={"input_type": "query"})
    np.testing.assert_allclose([d.embedding for d in q.data], _model(registry, "2").encode_queries(texts).numpy(), atol=1e-5)


@pytest.mark.system
def test_cli_serves_prints_the_url_and_stops_cleanly_on_ctrl_c(tiny_model_dir, tmp_path):
    """`samtone serve` in its own process (its own local Ray): ready URL on stdout, SIGINT -> exit 0."""
    import signal
    import sys

    port = free_loopback_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "samtone_ray.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and not line.startswith("serving "):  # Ray logs its own lines too
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "samtone serve exited early"
        assert f"http://127.0.0.1:{port}" in line
        status, body, _ = _post(f"http://127.0.0.1:{port}/v1/embeddings", {"model": tiny_model_dir.name, "input": "hi"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 32
        # The replica itself answers on the port (direct ingress), not Serve's proxy, and only on loopback.
        owners = listeners(port)
        assert list(owners) == ["0100007F"], owners
        assert "ServeReplica:" in owners["0100007F"] and "ProxyActor" not in owners["0100007F"], owners
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.system
def test_cli_refuses_a_port_in_use_before_starting_anything(tiny_model_dir):
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "samtone_ray.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port)],
            check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""},
        )
    assert done.returncode == 2
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


def test_a_lone_local_replica_gets_every_core():
    from samtone_ray.serve.app import default_num_cpus

    assert default_num_cpus(1, local=True) == os.cpu_count()
    assert default_num_cpus(2, local=True) == default_num_cpus(None, local=True) == 1  # replicas share the node
    assert default_num_cpus(1, local=False) == 1  # a cluster's deployment, or one joined at $RAY_ADDRESS


def test_a_local_cluster_is_started_only_without_an_address_or_a_connection(ray_cluster):
    # ``samtone serve`` asks before it connects, in a fresh process; this test process is already connected.
    from samtone_ray.core.runtime import starts_local_cluster

    ask = [sys.executable, "-c", "from samtone_ray.core.runtime import starts_local_cluster as s; print(s())"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    fresh = subprocess.run(ask, env=env, capture_output=True, text=True, check=True)
    joined = subprocess.run(ask, env={**env, "RAY_ADDRESS": "127.0.0.1:6379"}, capture_output=True, text=True, check=True)
    assert (fresh.stdout.strip(), joined.stdout.strip()) == ("True", "False")
    assert not starts_local_cluster()

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
from pathlib import Path

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
LIMITS = {"max_inputs": 8, "max_input_chars": 500, "max_body_bytes": 20_000, "max_top_k": 5, "max_search_results": 20}
TIMEOUTS = {"body_timeout_s": 2.0, "keep_alive_timeout_s": 2}


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
    from samtone_ray.serve.app import bind_app, deployment_options, http_options

    port = free_loopback_port()
    cfg = ServeConfig(max_batch_size=16, max_ongoing_requests=64, poll_interval_s=0.5, **LIMITS, **TIMEOUTS)
    serve.start(http_options=http_options("127.0.0.1", port, cfg))
    app = bind_app(
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
    yield {"url": url, "readiness": seen, "port": port}
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
    if before and before[-1][0] == 200:  # the model became ready between the last probe and this request
        before.pop()
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
    # issue 20: strict fields, invalid Unicode, deep nesting, /search amplification
    *[("/v1/embeddings", {"model": "tiny", "input": "x", "encoding_format": v}, {}, 422, "encoding_format") for v in ([], {}, "", None)],
    ("/v1/embeddings", {"model": "tiny", "input": "x", "dimensions": 32.0}, {}, 422, "dimensions"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "dimensions": None}, {}, 422, "dimensions"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "encodingformat": "float"}, {}, 422, "encodingformat"),
    ("/v1/embeddings", {"model": "tiny", "input": "\ud800abc"}, {}, 422, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": ["ok", "a\udfffb"]}, {}, 422, "input[1]"),
    ("/v1/embeddings", {"model": "\ud800", "input": "x"}, {}, 404, "model"),
    ("/v1/embeddings", {"model": "models:/tiny@champion", "input": "x"}, {}, 404, "model"),
    ("/v1/embeddings", b"[" * 15_000, {}, 400, None),
    ("/v1/embeddings", b'{"input": ' + b"[" * 15_000, {}, 400, None),
    ("/search", {"query": "\ud800"}, {}, 422, "query"),
    ("/search", {"queries": ["a", "b", "c", "d", "e"], "top_k": 5}, {}, 422, "top_k"),
    ("/search", {"query": "disk", "model": "other"}, {}, 404, "model"),
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
        parse_embeddings({"model": "m", "input": "x", "dimensions": 64}, limits, "m", 384)
    assert exc.value.status == 422 and exc.value.param == "dimensions"
    assert parse_embeddings({"model": "m", "input": "x", "dimensions": 384}, limits, "m", 384).texts == ["x"]


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
    """`samtone serve` in its own process (its own local Ray), with keys from a file and the
    environment: ready URL on stdout, the keys asked for and never printed, SIGINT -> exit 0."""
    import signal
    import sys

    port = free_loopback_port()
    (tmp_path / "keys").write_text("sk-cli-file-key\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "samtone_ray.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--api-key-file", str(tmp_path / "keys")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_ADDRESS": "", "SAMTONE_API_KEY": "sk-cli-env-key"},
    )
    output = []
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and not line.startswith("serving "):  # Ray logs its own lines too
            line = proc.stdout.readline()
            output.append(line)
            assert line or proc.poll() is None, "samtone serve exited early"
        assert f"http://127.0.0.1:{port}" in line and "2 API keys" in line
        request = {"model": tiny_model_dir.name, "input": "hi"}
        assert _post(f"http://127.0.0.1:{port}/v1/embeddings", request)[0] == 401
        for key in ("sk-cli-file-key", "sk-cli-env-key"):
            status, body, _ = _post(f"http://127.0.0.1:{port}/v1/embeddings", request, {"Authorization": f"Bearer {key}"})
            assert status == 200 and len(body["data"][0]["embedding"]) == 32
        # The replica itself answers on the port (direct ingress), not Serve's proxy, and only on loopback.
        owners = listeners(port)
        assert list(owners) == ["0100007F"], owners
        assert "ServeReplica:" in owners["0100007F"] and "ProxyActor" not in owners["0100007F"], owners
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert "sk-cli" not in "".join(output) + rest
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


# ---------------------------------------------------------------------- issue 20: a server safe to expose
# A second app on the same Serve instance (route /secure): a model directory, two API keys (one as
# its digest, one from a variable of the replica's environment, as a Kubernetes secret gives it),
# trusted hosts, and the default request limits (20,000-character inputs).

KEYS = ("sk-samtone-test-digest-1", "sk-samtone-test-env-2")
SECURE_LIMITS = {"max_inputs": 128}


@pytest.fixture(scope="module")
def secure(server, tiny_model_dir):
    from ray import serve

    from samtone_ray.core.config import ServeConfig
    from samtone_ray.serve.app import bind_app, deployment_options
    from samtone_ray.serve.auth import digest

    options = deployment_options(1, serve_cfg=ServeConfig(**SECURE_LIMITS, **TIMEOUTS))
    options["ray_actor_options"]["runtime_env"] = {"env_vars": {"SAMTONE_TEST_KEYS": KEYS[1]}}  # the secret's stand-in
    args = {
        "model": str(tiny_model_dir),
        "api_key_sha256": [digest(KEYS[0])],
        "api_key_env": "SAMTONE_TEST_KEYS",
        "trusted_hosts": ["127.0.0.1", "localhost", "api.example.test"],
    }
    serve.run(bind_app(args, options), name="samtone-secure", route_prefix="/secure", blocking=False)
    url = f"{server['url']}/secure"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _get(f"{url}/readyz")[0] != 200:
        time.sleep(0.1)
    return {"url": url, "name": tiny_model_dir.name, "path": str(tiny_model_dir), "port": server["port"]}


def _request(url: str, method: str = "GET", payload=None, headers: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


PROTECTED = [
    ("POST", "/v1/embeddings", {"model": "x", "input": "hi"}),
    ("POST", "/search", {"query": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/info", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/nowhere", None),
]


@pytest.mark.parametrize("method,route,payload", PROTECTED, ids=[r for _, r, _ in PROTECTED])
def test_every_route_but_the_probes_needs_a_key(secure, method, route, payload):
    for headers, code in (({}, "missing_api_key"), (_auth("sk-wrong"), "invalid_api_key"), ({"Authorization": KEYS[0]}, "invalid_api_key")):
        status, body, hdrs = _request(secure["url"] + route, method, payload, headers)
        assert status == 401, (route, headers, status, body)
        assert hdrs.get("www-authenticate", hdrs.get("WWW-Authenticate")) == "Bearer"
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
        assert KEYS[0] not in body.decode() and KEYS[1] not in body.decode()
    status, _, _ = _request(secure["url"] + route, method, payload, _auth(KEYS[0]))
    assert status != 401


def test_both_keys_open_the_api_and_the_probes_and_options_stay_open(secure):
    url = secure["url"]
    for key in KEYS:  # one given as a digest, one read by the replica from its environment
        status, body, _ = _request(f"{url}/v1/embeddings", "POST", {"model": secure["name"], "input": "hi"}, _auth(key))
        assert status == 200, body
    for probe in ("/healthz", "/readyz"):
        assert _request(url + probe)[0] == 200
    status, body, _ = _request(f"{url}/v1/embeddings", "OPTIONS")  # CORS preflight carries no credentials
    assert status != 401 and status < 500, (status, body)


def test_the_openai_client_works_with_its_api_key_and_says_401_without(secure, tiny_model_dir):
    import openai
    from openai import OpenAI

    from samtone_ray.model.towers import DualEncoder

    good = OpenAI(base_url=f"{secure['url']}/v1", api_key=KEYS[1], max_retries=0, timeout=60)
    out = good.embeddings.create(model=secure["name"], input=["mount a disk"])
    np.testing.assert_allclose(out.data[0].embedding, DualEncoder.from_pretrained(tiny_model_dir).encode_documents(["mount a disk"])[0].numpy(), atol=1e-5)
    bad = OpenAI(base_url=f"{secure['url']}/v1", api_key="sk-not-this-one", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        bad.embeddings.create(model=secure["name"], input="x")


def test_untrusted_host_is_refused_even_with_a_key(secure):
    url, port = secure["url"], secure["port"]
    for host in ("evil.example", f"rebind.attacker.test:{port}", "api.example.test.evil"):
        status, body, _ = _request(f"{url}/healthz", headers={"Host": host})
        assert status == 400 and json.loads(body)["error"]["code"] == "untrusted_host", (host, status)
        status, _, _ = _request(f"{url}/v1/models", headers={"Host": host, **_auth(KEYS[0])})
        assert status == 400
    for host in (f"localhost:{port}", f"API.example.test:{port}", "127.0.0.1"):
        assert _request(f"{url}/v1/models", headers={"Host": host, **_auth(KEYS[0])})[0] == 200, host


def test_the_model_path_is_never_shown_nor_taken_as_a_name(secure):
    url, path = secure["url"], secure["path"]
    for route in ("/v1/models", "/info"):
        status, body, _ = _request(url + route, headers=_auth(KEYS[0]))
        assert status == 200 and path not in body.decode(), route
    assert json.loads(_request(f"{url}/v1/models", headers=_auth(KEYS[0]))[1])["data"][0]["id"] == secure["name"]
    status, body, _ = _request(f"{url}/v1/embeddings", "POST", {"model": path, "input": "x"}, _auth(KEYS[0]))
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


def test_the_keys_never_reach_the_logs(secure, ray_cluster):
    """Requests with the digest-only key, right and wrong: Ray's session logs (Serve's access and
    replica logs included) never hold it."""
    from ray._private.worker import _global_node

    for key in (KEYS[0], KEYS[0] + "x"):
        _request(f"{secure['url']}/v1/models", headers=_auth(key))
    time.sleep(1.0)  # log lines are flushed asynchronously
    logs = Path(_global_node.get_session_dir_path()) / "logs"
    leaked = [p for p in logs.rglob("*") if p.is_file() and KEYS[0].encode() in p.read_bytes()]
    assert not leaked


def test_long_inputs_are_cut_before_tokenising_and_embed_exactly(secure, tiny_model_dir):
    """Inputs of up to max_input_chars (20,000) are cut to a bound from the max length before
    tokenising; the embeddings and token counts are those of the full texts (the model's own
    encode, which tokenises everything, is the oracle), including texts the cut alone would get
    wrong (leading whitespace, one huge word)."""
    from samtone_ray.model.towers import DualEncoder

    model = DualEncoder.from_pretrained(tiny_model_dir)
    texts = ["mount the usb disk " * 1000, " " * 15_000 + "grub password " * 300, "a" * 19_000, "kernel" * 3000]
    status, body, _ = _request(f"{secure['url']}/v1/embeddings", "POST", {"model": secure["name"], "input": texts, "encoding_format": "float"}, _auth(KEYS[0]))
    assert status == 200, body
    body = json.loads(body)
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], model.encode_documents(texts).numpy(), atol=1e-5)
    want = sum(len(model.tokenizer(t, truncation=True, max_length=model.doc_max_length)["input_ids"]) for t in texts)
    assert body["usage"]["prompt_tokens"] == want


def test_long_inputs_do_not_stall_the_event_loop(secure):
    """Two requests of 128 texts of 20,000 characters while /healthz is polled: tokenising runs in
    its own thread on cut texts, so the probe keeps answering (on the event loop it waited for
    every request's tokenising: seconds)."""
    text = "configure a static ip address with netplan " * 465  # 19,995 characters
    payload = {"model": secure["name"], "input": [text] * 128}
    results, latencies = [], []

    def big():
        results.append(_request(f"{secure['url']}/v1/embeddings", "POST", payload, _auth(KEYS[0]))[0])

    threads = [threading.Thread(target=big) for _ in range(2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        assert _request(f"{secure['url']}/healthz")[0] == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    for t in threads:
        t.join()
    print(f"/healthz during 2 x 128 x 20k characters: {len(latencies)} probes, worst {max(latencies):.3f} s")
    assert results == [200, 200]
    assert max(latencies) < 1.0, latencies


def _raw(port: int, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; what comes back until the server closes it (or
    ``wait_s`` passes), and when the connection was closed (inf: still open)."""
    import socket

    t0 = time.monotonic()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, socket.timeout):
            return got, float("inf")
        except ConnectionResetError:
            pass
    return got, time.monotonic() - t0


def test_a_body_that_stops_halfway_gets_408(secure):
    head = (
        f"POST /secure/v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS[0]}\r\nContent-Length: 200\r\n\r\n"
    ).encode()
    got, _ = _raw(secure["port"], head + b'{"model": "x", "inp', wait_s=20)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"body_timeout" in got


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(secure):
    request = b"GET /secure/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    got, closed_after = _raw(secure["port"], request, wait_s=20)
    assert got.startswith(b"HTTP/1.1 200")
    assert closed_after < TIMEOUTS["keep_alive_timeout_s"] + 5, closed_after  # Serve's default: 90 s


def test_fuzzed_json_never_gives_a_5xx(secure):
    """800 Hypothesis-made bodies, about a minute on 2 shared cores (known and unknown fields, any
    JSON values, lone surrogates, raw bytes), against both routes: every answer is a 2xx or an
    OpenAI-shaped 4xx, and the server answers after."""
    from collections import Counter

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
    scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | text
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12)
    fields = {
        "/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "user", "input_type"],
        "/search": ["query", "queries", "top_k", "model"],
    }
    likely = {"model": st.one_of(st.just(secure["name"]), st.just(secure["name"]), value), "encoding_format": st.sampled_from(["float", "base64"]) | value,
              "dimensions": st.just(32) | value, "input_type": st.sampled_from(["query", "document"]) | value,
              "top_k": st.integers(-3, 200) | value, "input": text | st.lists(text, max_size=5) | value,
              "query": text | value, "queries": st.lists(text, max_size=5) | value}

    required = {"/v1/embeddings": ["model", "input"], "/search": ["query"]}

    @st.composite
    def bodies(draw):
        route = draw(st.sampled_from(sorted(fields)))
        keys = draw(st.lists(st.sampled_from(fields[route]) | text, max_size=4, unique=True))
        if draw(st.booleans()):  # half with the required fields: the checks past them get reached too
            keys = list(dict.fromkeys(required[route] + keys))
        body = {k: draw(likely.get(k, value)) for k in keys}
        raw = draw(st.none() | st.binary(max_size=200))
        return route, json.dumps(body).encode() if raw is None else raw

    seen = []

    @settings(max_examples=800, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(bodies())
    def check(case):
        route, raw = case
        req = urllib.request.Request(
            secure["url"] + route, data=raw, method="POST", headers={"Content-Type": "application/json", **_auth(KEYS[0])}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        seen.append(status)
        assert status < 500, (route, raw[:300], status, body[:300])
        if status >= 400:
            assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}

    t0 = time.monotonic()
    check()
    print(f"fuzz: {len(seen)} requests in {time.monotonic() - t0:.0f} s, statuses {dict(Counter(seen))}")
    assert 200 in seen and 422 in seen  # valid and invalid requests were both made
    assert _request(f"{secure['url']}/healthz")[0] == 200

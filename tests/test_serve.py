"""`peft-ft serve` (FastAPI + uvicorn) over a real socket on 127.0.0.1 with tiny models: keys, Host, limits,
names, docs, mixed-adapter batches, tokens and deadlines, runtime adapters and the LRU, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import TEXTS, recipe_text, reference, sentiment_rows, train_ner, train_sentiment, write_jsonl, write_recipe
from peft_ft.serving.app import Metrics
from peft_ft.serving.predict import AdapterSet
from peft_ft.serving.scheduler import Job, Scheduler
from peft_ft.serving.serve import make_server

KEY, ADMIN = "s3cret-key", "adm1n-key"
LIMITS = {"max_body": 4096, "max_texts": 8, "max_batch": 8, "max_wait_ms": 20, "max_tokens": 400}


def train_weak(root: Path, tiny_bert: Path) -> Path:
    """A third sentiment adapter with its own head: another seed, fewer epochs."""
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe

    data = root / "data-weak"
    data.mkdir(parents=True)
    write_jsonl(data / "train.jsonl", sentiment_rows(64, seed=5))
    recipe = write_recipe(root / "weak.toml", recipe_text(
        tiny_bert, data, train_opts={"epochs": 8, "batch_size": 16, "lr": 1e-2, "seed": 7}, output={"dir": root / "runs", "name": "weak"}))
    return run(load_recipe(recipe))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("serve")
    return {"pos": train_sentiment(root, tiny_bert, "pos"), "flip": train_sentiment(root, tiny_bert, "flip", flip=True),
            "weak": train_weak(root, tiny_bert), "ner": train_ner(root, tiny_bert)}


@pytest.fixture(scope="module")
def adapters(runs):
    return AdapterSet(runs)


def start(adapters, **settings):
    srv = make_server(adapters, "127.0.0.1", 0, **settings)
    srv.start()
    deadline = time.monotonic() + 10
    while not srv.uvicorn.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return srv


@pytest.fixture(scope="module")
def server(adapters):
    srv = start(adapters, api_key=KEY, **LIMITS)
    yield srv.url
    srv.stop()


def call(url: str, body: bytes | None = None, key: str | None = KEY, method: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
            return response.status, json.loads(data) if data else {}
    except urllib.error.HTTPError as e:
        data = e.read()
        return e.code, json.loads(data) if data else {}


def raw(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes (or `timeout`)."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def texts_body(texts) -> bytes:
    return json.dumps({"texts": texts}).encode()


def test_each_adapter_answers_with_its_own_labels_single_text_and_batch(server, runs):
    status, listing = call(f"{server}/adapters")
    assert status == 200 and set(listing["adapters"]) == {"pos", "flip", "weak", "ner"}
    assert listing["adapters"]["flip"]["labels"] == ["neg", "pos"] and listing["adapters"]["pos"]["mixes"] is True
    assert listing["adapters"]["ner"]["mixes"] is False  # LoRA, but no other loaded adapter shares its labels
    expected = {name: reference(runs[name], TEXTS) for name in ("pos", "flip")}
    for name in ["pos", "flip", "pos"]:
        status, answer = call(f"{server}/predict/{name}", texts_body(TEXTS))
        assert status == 200 and answer["adapter"] == name
        assert [{k: p[k] for k in ("label", "score")} for p in answer["predictions"]] == expected[name]
    status, answer = call(f"{server}/predict/flip", json.dumps({"text": TEXTS[0]}).encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and [p["label"] for p in answer["predictions"]] == [expected["flip"][0]["label"]]  # `curl -d` works
    status, answer = call(f"{server}/predict/flip", json.dumps({"inputs": [{"text": TEXTS[0], "id": "r1"}, TEXTS[1]]}).encode())
    assert status == 200 and [p["label"] for p in answer["predictions"]] == [e["label"] for e in expected["flip"][:2]]
    assert answer["predictions"][0]["id"] == "r1" and "id" not in answer["predictions"][1]  # a row's id comes back


def test_docs_openapi_head_and_options(server):
    status, spec = call(f"{server}/openapi.json", key=None)
    assert status == 200 and {"/predict/{adapter}", "/adapters", "/adapters/{name}", "/health", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"PredictRequest", "QuestionRow", "PairRow", "TokensRow", "LabelAnswer", "EntitiesAnswer", "SpanAnswer", "GeneratedAnswer"} <= set(schemas)
    examples = spec["paths"]["/predict/{adapter}"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {"classification", "qa", "ner_tokens", "pair", "seq2seq"} <= set(examples)
    # /docs and /redoc load their scripts from this server, never a CDN (they rendered blank offline), without a key
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        with urllib.request.urlopen(f"{server}{page}", timeout=10) as response:
            html = response.read().decode()
        assert response.status == 200 and "http" not in html.replace("http-equiv", ""), html
        for asset in assets:
            assert f"/docs-assets/{asset}" in html
            with urllib.request.urlopen(f"{server}/docs-assets/{asset}", timeout=10) as response:
                assert response.status == 200 and len(response.read()) > 100_000
    with urllib.request.urlopen(f"{server}/docs-assets/swagger-ui-bundle.js", timeout=10) as response:
        assert b"3.1" in response.read()  # Swagger UI 5: FastAPI's schema is OpenAPI 3.1, which Swagger UI 4 cannot show
    with urllib.request.urlopen(urllib.request.Request(f"{server}/health", method="HEAD"), timeout=10) as response:
        assert response.status == 200 and response.read() == b""
    # each path's own methods (it was one list for every path)
    for path, allow in (("/predict/pos", b"post, options"), ("/health", b"get, head, options"),
                        ("/adapters", b"get, head, post, options"), ("/adapters/pos", b"delete, options")):
        answer = raw(server, b"OPTIONS " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 204") and b"allow: " + allow + b"\r\n" in answer.lower(), (path, answer)
    answer = raw(server, b"OPTIONS /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404") and b"no route /nowhere" in answer


def test_without_the_right_key_401_and_nothing_computed(server):
    def batches():
        return call(f"{server}/metrics")[1]["batches"]

    before = batches()
    for key in (None, "wrong", KEY + "x", ""):
        status, error = call(f"{server}/predict/pos", texts_body(["good"]), key=key)
        assert status == 401 and "Authorization: Bearer" in error["error"]
        assert call(f"{server}/adapters", key=key)[0] == 401
        assert call(f"{server}/metrics", key=key)[0] == 401
        assert call(f"{server}/adapters", json.dumps({"name": "x", "path": "y"}).encode(), key=key)[0] == 403  # no admin key set: loading is off
    assert batches() == before  # no request reached the model
    assert call(f"{server}/health", key=None) == (200, {"status": "ok", "adapters": 4})


def test_body_limits_are_checked_from_the_headers_without_reading_the_body(server):
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    for length, status in [(b"-1", b"400"), (b"-5000", b"400"), (b"abc", b"400"), (b"10000000000000", b"413"), (b"4097", b"413")]:
        started = time.monotonic()
        answer = raw(server, b"POST /predict/pos HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Length: " + length + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 " + status), (length, answer[:200])
        assert time.monotonic() - started < 5  # answered at once: it never waited for the body
    assert b"--max-body-bytes" in raw(server, b"POST /predict/pos HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Length: 4097\r\n\r\n")
    # curl sends "Expect: 100-continue" for a body over 1 MB and waits: the refusal must come instead of the invitation
    # (with "100 Continue" first, curl sent the body into a closing connection: "Connection reset by peer", no message)
    answer = raw(server, b"POST /predict/pos HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Expect: 100-continue\r\nContent-Length: 4097\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in answer, answer[:200]
    answer = raw(server, b"POST /predict/pos HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")
    status, error = call(f"{server}/predict/pos/", texts_body(["good"]))  # was an empty 307 to the path without the slash
    assert status == 404 and error["error"].startswith("no such path /predict/pos/")
    status, error = call(f"{server}/predict/pos", texts_body([]))
    assert status == 422 and error["error"] == '"texts" is empty: send at least one'
    status, error = call(f"{server}/predict/pos", texts_body(["good"] * 9))
    assert status == 422 and "has 9 items; this server takes at most 8 per request (--max-texts)" in error["error"]
    assert call(f"{server}/predict/pos", texts_body(["good"] * 8))[0] == 200


def test_bad_bodies_get_400_or_422_never_500(server):
    for body, status, message in [(b'{"texts": ["good"', 400, "body is not valid JSON"), (b"[" * 2000 + b"]" * 2000, 400, "nested too deeply"),
                                  (b'{"rows": ["good"]}', 422, "rows: Extra inputs"), (b'{"texts": "good"}', 422, "texts"),
                                  (b'{"text": "a", "texts": ["b"]}', 422, "exactly one"), (b"[1]", 422, ""), (b"\xff\xfe", 400, "not valid JSON"),
                                  (b'{"inputs": [{"sentence": "good"}]}', 400, "inputs[0]: expected a text field 'text'"),
                                  (b'{"texts": [[[["deep"]]]]}', 422, "texts.0"),
                                  (b'{"text": "a", "text": "b"}', 400, "body: the key 'text' appears twice in one object"),
                                  (b'{"inputs": [{"text": "a", "id": NaN}]}', 400, "body: NaN is not a JSON value"),
                                  # an id answered back: past float's range it was infinity, a lone surrogate no UTF-8 (500s)
                                  (b'{"inputs": [{"text": "a", "id": 1e999}]}', 400, "body: the number 1e999 is out of the range of a float"),
                                  (b'{"inputs": [{"text": "a", "id": "\\ud800"}]}', 400, "body: field 'inputs[0].id': character 0 is a lone UTF-16 surrogate")]:
        got, error = call(f"{server}/predict/pos", body)
        assert got == status and message in error["error"], (body[:40], got, error)
    assert call(f"{server}/predict/pos", b'{"texts": ["good"]}')[0] == 200
    status, answer = call(f"{server}/predict/pos", b'{"inputs": [{"text": "a", "id": "\\ud83d\\ude00"}]}')  # a pair is one character
    assert status == 200 and answer["predictions"][0]["id"] == "\U0001f600"


def test_an_object_of_many_keys_is_read_in_linear_time_and_long_integers_in_words():
    """The duplicate-key check counted every key against every other: an object of 20,000 keys (200 KB, under the
    body limit) took 6.7 s of the event loop, 100,000 keys minutes. An integer past Python's digit limit was refused
    with advice for Python programmers (sys.set_int_max_str_digits)."""
    from peft_ft.data.files import strict_json

    with pytest.raises(ValueError, match=r"^an integer of 4400 digits is too long \(at most 4300\); send it as a string$"):
        strict_json('{"id": -' + "7" * 4400 + "}")
    body = "{" + ",".join(f'"k{i}": 0' for i in range(200_000)) + ', "k7": 1}'
    with pytest.raises(ValueError, match="the key 'k7' appears twice in one object"):
        strict_json(body)  # quadratic, this would not finish within the suite's timeout


def test_unknown_and_path_like_adapter_names_are_404_and_never_touch_the_disk(server, runs):
    opened, watching = [], threading.Event()

    def audit(event, args):  # every file the process opens while the requests run
        if watching.is_set() and event == "open":
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # cannot be removed: it records only while `watching` is set
    run_dir = runs["pos"].resolve()
    names = ["nope", "..%2F..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "pos%2F..%2F..", "../../etc/passwd",
             "pos/../flip", str(run_dir).replace("/", "%2F"), "..", "pos.json"]
    watching.set()
    try:
        for name in names:
            status, error = call(f"{server}/predict/{name}", texts_body(["good"]))
            assert status == 404 and ("unknown adapter" in error["error"] or "no such path" in error["error"]), name
    finally:
        watching.clear()
    assert not [p for p in opened if "etc" in p or "passwd" in p or str(run_dir) in p or ".." in p], opened
    status, error = call(f"{server}/elsewhere")
    assert status == 404 and "/docs" in error["error"]


def test_token_cap_413_names_the_limit(server):
    status, error = call(f"{server}/predict/pos", texts_body(["good film " * 30] * 8))  # 8 texts of 62 tokens: over 400
    assert status == 413 and "at most 400 per request (--max-tokens)" in error["error"]
    assert call(f"{server}/predict/pos", texts_body(["good film"] * 8))[0] == 200


def test_slow_headers_are_dropped_and_a_slow_body_gets_408(adapters, monkeypatch):
    from peft_ft.serving import serve

    monkeypatch.setattr(serve, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(serve, "BODY_TIMEOUT", 0.5)
    srv = start(adapters, api_key=KEY)
    try:
        started = time.monotonic()
        assert raw(srv.url, b"GET /health HTTP/1.1\r\nHo", timeout=10) == b""  # closed without an answer
        assert time.monotonic() - started < 5
        answer = raw(srv.url, f"POST /predict/pos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 50\r\n\r\n{{".encode())
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer
        assert call(f"{srv.url}/health")[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("admin", [None, ADMIN], ids=["no keys", "admin key only"])
def test_wrong_host_is_403_without_a_key(adapters, admin, tmp_path):
    srv = start(adapters, admin_key=admin, adapter_dir=str(tmp_path))
    try:
        for host in (b"evil.example", b"evil.example:80", b"127.0.0.1.evil.example"):
            answer = raw(srv.url, b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 403") and b"Host" in answer, host
        for host in (b"127.0.0.1", b"localhost:1234", b"[::1]:80"):
            assert raw(srv.url, b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200"), host
    finally:
        srv.stop()


def test_mixed_adapter_batches_equal_the_answers_alone(adapters, runs):
    """Rows of three LoRA adapters with different heads in one forward: every answer equals the same
    text answered alone, and the batch really was one forward (peft's per-row adapter_names)."""
    names = ["pos", "flip", "weak"] * 4
    inputs = [TEXTS[(i // 3) % len(TEXTS)] for i in range(len(names))]  # each text to all three
    alone = [adapters.run_inputs(n, [t])[0] for n, t in zip(names, inputs)]
    assert {adapters.mix_key(n) for n in ("pos", "flip", "weak")} == {adapters.mix_key("pos")} and adapters.mix_key("pos") is not None
    forwards = []
    hook = adapters.get("pos").group.model.register_forward_hook(lambda m, a, kw, out: forwards.append(kw.get("adapter_names")), with_kwargs=True)
    try:
        mixed = adapters.run_mixed(names, inputs)
    finally:
        hook.remove()
    assert len(forwards) == 1 and forwards[0] is not None and sorted(set(forwards[0])) == ["flip", "pos", "weak"]
    for got, want in zip(mixed, alone):
        assert got["adapter"] == want["adapter"] and got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert len({(a["adapter"], a["score"]) for a in alone}) > len(set(inputs)) + 2  # the three heads do answer differently

    # The same through the scheduler: queued jobs of the three adapters share batches.
    metrics = Metrics()
    scheduler = Scheduler(adapters, metrics, max_batch_tokens=10_000, max_batch=32, max_wait_ms=200)
    jobs = [Job(n, [t], [5], time.monotonic() + 30) for n, t in zip(names, inputs)]
    for job in jobs:
        scheduler.submit(job)
    for job, want in zip(jobs, alone):
        [got] = job.future.result(timeout=30)
        assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert metrics.snapshot()["mixed_batches"] >= 1
    # --no-mix: every forward holds one adapter
    metrics = Metrics()
    scheduler = Scheduler(adapters, metrics, max_batch_tokens=10_000, max_batch=32, max_wait_ms=200, mix=False)
    jobs = [Job(n, [t], [5], time.monotonic() + 30) for n, t in zip(names, inputs)]
    for job in jobs:
        scheduler.submit(job)
    assert [job.future.result(timeout=30)[0]["label"] for job in jobs] == [a["label"] for a in alone]
    assert metrics.snapshot()["mixed_batches"] == 0


def test_ner_adapters_mix_and_every_window_gets_its_texts_adapter(runs, tmp_path_factory, tiny_bert):
    """Two NER adapters (other seeds and epochs: other answers) in one forward: each text's windows, a long text's
    several among them, run with that text's adapter; every answer equals the text answered alone."""
    other = train_ner(tmp_path_factory.mktemp("ner2"), tiny_bert, name="ner2", seed=3, epochs=4)
    adapters = AdapterSet({"ner": runs["ner"], "ner2": other})
    assert adapters.mix_key("ner") == adapters.mix_key("ner2") is not None
    long_text = " ".join(["john lives in paris ."] * 12)  # 60 words: windows of max_length 32 tokens
    texts = ["mary works in berlin .", long_text, "john lives in london .", "", "paris"]
    names = [n for t in texts for n in ("ner", "ner2")]
    inputs = [adapters.inputs(n, [{"text": t}])[0] for t in texts for n in ("ner", "ner2")]
    alone = [adapters.run_inputs(n, [i])[0] for n, i in zip(names, inputs)]
    forwards = []
    hook = adapters.get("ner").group.model.register_forward_hook(
        lambda m, a, kw, out: forwards.append(kw.get("adapter_names")), with_kwargs=True)
    try:
        mixed = adapters.run_mixed(names, inputs)
    finally:
        hook.remove()
    assert any(f is not None and set(f) == {"ner", "ner2"} for f in forwards)  # adapters shared a forward
    assert sum(len(f) for f in forwards) > len([t for t in texts if t]) * 2  # the long text ran as several windows
    for got, want in zip(mixed, alone):
        assert got["adapter"] == want["adapter"] and got["tags"] == want["tags"]
        assert [e["entity_group"] for e in got["entities"]] == [e["entity_group"] for e in want["entities"]]
        assert [e["score"] for e in got["entities"]] == pytest.approx([e["score"] for e in want["entities"]], abs=1e-5)
    assert [a["tags"] for a in alone[0::2]] != [a["tags"] for a in alone[1::2]]  # the two adapters do answer differently


def test_concurrent_requests_over_the_socket_get_their_own_adapters_answer(server):
    pairs = [(name, text) for name in ("pos", "flip", "weak") for text in TEXTS] * 2
    alone = {(n, t): call(f"{server}/predict/{n}", texts_body([t]))[1]["predictions"][0] for n, t in set(pairs)}
    before = call(f"{server}/metrics")[1]["mixed_batches"]
    results, errors, go = [], [], threading.Barrier(len(pairs))

    def ask(name, text):
        try:
            go.wait(timeout=30)
            results.append((name, text, *call(f"{server}/predict/{name}", texts_body([text]))))
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == len(pairs)
    for name, text, status, answer in results:
        [got] = answer["predictions"]
        assert status == 200 and got["adapter"] == name and got["label"] == alone[(name, text)]["label"]
        assert got["score"] == pytest.approx(alone[(name, text)]["score"], abs=1e-5)
    metrics = call(f"{server}/metrics")[1]
    assert metrics["mixed_batches"] > before
    assert metrics["adapters"]["pos"]["p99_ms"] >= metrics["adapters"]["pos"]["p50_ms"] > 0


def test_a_long_ner_text_is_tagged_to_its_end(server):
    long_text = "mary lives in london . " + "the film was good . " * 60 + "john works in paris ."  # ~310 tokens (cap 400)
    status, answer = call(f"{server}/predict/ner", texts_body([long_text, "john works in paris ."]))
    assert status == 200, answer
    whole, short = answer["predictions"]
    assert whole["truncated"] is False and short["truncated"] is False  # windows of model.max_length (32) cover every word
    # entities come back from the text's last words too (before windows: none after the first ~150 characters)
    assert any(e["start"] > len(long_text) - 30 for e in whole["entities"])
    assert ("PER", "john") in {(e["entity_group"], e["word"]) for e in short["entities"]}


def test_deadline_gives_504_frees_the_worker_and_the_next_request_is_served(adapters, monkeypatch):
    calls = []
    real = AdapterSet.run_inputs

    def slow(self, name, inputs):
        calls.append(len(inputs))
        if any("slow" in str(i) for i in inputs):
            time.sleep(0.4)
        return real(self, name, inputs)

    monkeypatch.setattr(AdapterSet, "run_inputs", slow)
    srv = start(adapters, api_key=KEY, max_batch=1, max_wait_ms=0, request_timeout=1.0, mix=False)
    try:
        started = time.monotonic()
        status, error = call(f"{srv.url}/predict/pos", texts_body(["slow film"] * 8))
        assert status == 504 and "deadline of 1 s (--request-timeout)" in error["error"]
        assert time.monotonic() - started < 2.5
        started = time.monotonic()
        status, answer = call(f"{srv.url}/predict/pos", texts_body(["good film"]))
        assert status == 200 and time.monotonic() - started < 1.5  # at most the batch running at the deadline was finished
        time.sleep(0.5)
        assert calls.count(1) < 8 + 1  # the slow request's remaining rows were dropped
    finally:
        srv.stop()


def test_a_big_request_does_not_hold_up_a_small_one(adapters, monkeypatch):
    """Rows are taken from every waiting request in turn: a one-text request sent while an 8-text one
    runs (one row per forward here) is answered long before the big one."""
    real = AdapterSet.run_inputs

    def slow(self, name, inputs):
        time.sleep(0.25)
        return real(self, name, inputs)

    monkeypatch.setattr(AdapterSet, "run_inputs", slow)
    srv = start(adapters, api_key=KEY, max_batch=1, max_wait_ms=0, mix=False)
    try:
        done = {}

        def ask(label, texts):
            done[label] = (call(f"{srv.url}/predict/pos", texts_body(texts))[0], time.monotonic())

        big = threading.Thread(target=ask, args=("big", ["good film"] * 8))
        big.start()
        time.sleep(0.4)
        ask("small", ["bad film"])
        big.join(timeout=30)
        assert done["small"][0] == done["big"][0] == 200
        assert done["big"][1] - done["small"][1] > 0.7  # at least 3 of the big request's rows were still to run
    finally:
        srv.stop()


def test_runtime_load_unload_inside_the_allow_list_only(adapters, runs, tmp_path):
    import shutil

    # as deep as the runs: their local base model is recorded relative to the run folder (peft_ft.rundir.portable)
    allowed = runs["flip"].parent.parent / f"{tmp_path.name}-allowed"
    allowed.mkdir()
    shutil.copytree(runs["flip"], allowed / "flip_run")
    outside = tmp_path / "outside"
    shutil.copytree(runs["pos"], outside)
    (allowed / "link_out").symlink_to(outside, target_is_directory=True)
    sneaky = allowed / "sneaky"
    shutil.copytree(runs["pos"], sneaky)
    (sneaky / "adapter_model.safetensors").unlink()
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    srv = start(adapters, api_key=KEY, admin_key=ADMIN, adapter_dir=str(allowed))
    try:
        load = lambda name, path, key=ADMIN: call(f"{srv.url}/adapters", json.dumps({"name": name, "path": path}).encode(), key=key)
        assert load("late", "flip_run", key=KEY)[0] == 401  # the API key is not the admin key
        for path in ("../outside", str(outside), "link_out", "sneaky", "flip_run/../../outside", "/etc"):
            status, error = load("evil", path)
            assert status == 403 and "refused" in error["error"], (path, error)
        assert load("evil", "missing")[0] == 404
        pickled = allowed / "pickled"
        shutil.copytree(runs["flip"], pickled)
        (pickled / "training_args.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
        status, error = load("pickled", "pickled")
        assert status == 422 and "training_args.bin" in error["error"] and "pickled" not in adapters.names
        assert load("bad/name", "flip_run")[0] == 422
        status, answer = load("late", "flip_run")
        assert status == 201 and answer["loaded"] == "late"
        assert load("late", "flip_run")[0] == 409
        status, answer = call(f"{srv.url}/predict/late", texts_body(TEXTS[:2]))
        assert status == 200 and [p["label"] for p in answer["predictions"]] == [a["label"] for a in adapters.run_inputs("flip", TEXTS[:2])]
        assert call(f"{srv.url}/adapters/late", method="DELETE", key=KEY)[0] == 401
        assert call(f"{srv.url}/adapters/late", method="DELETE", key=ADMIN) == (200, {"unloaded": "late"})
        assert call(f"{srv.url}/predict/late", texts_body(["good"]))[0] == 404
        assert "late" not in adapters.names
    finally:
        srv.stop()


def test_metrics_count_every_refusal_and_a_lone_surrogate_is_400_in_every_field(runs):
    """Refusals made before a route runs (the key, the body size, the schema) count in /metrics like the route's own;
    health probes, docs and /metrics itself do not."""
    srv = start(AdapterSet({"pos": runs["pos"]}), api_key=KEY, max_body=2000)
    try:
        sent = [
            call(f"{srv.url}/predict/pos", texts_body(["good"]), key=None)[0],  # 401
            call(f"{srv.url}/predict/pos", json.dumps({"text": 5}).encode())[0],  # 422: not a string
            call(f"{srv.url}/predict/pos", b"{not json")[0],  # 400
            call(f"{srv.url}/predict/pos", texts_body(["x" * 3000]))[0],  # 413: over --max-body-bytes
            call(f"{srv.url}/predict/nope", texts_body(["good"]))[0],  # 404
            call(f"{srv.url}/predict/pos", texts_body(["good"]))[0],  # 200
        ]
        for body in (b'{"text": "\\ud800"}', b'{"texts": ["\\ud800"]}', b'{"inputs": [{"text": "\\ud800"}]}'):
            status, answer = call(f"{srv.url}/predict/pos", body)
            sent.append(status)
            assert status == 400 and "lone UTF-16 surrogate" in answer["error"], (body, answer)
        assert sent[:6] == [401, 422, 400, 413, 404, 200]
        call(f"{srv.url}/health", key=None)
        call(f"{srv.url}/openapi.json", key=None)
        metrics = call(f"{srv.url}/metrics")[1]
        assert metrics["requests"] == len(sent) == 9
        assert metrics["errors"] == {"401": 1, "422": 1, "400": 4, "413": 1, "404": 1}
        # per adapter: the requests its route answered (the 200; the surrogates are refused with the body, before routing)
        assert metrics["adapters"]["pos"]["requests"] == 1 and metrics["adapters"]["pos"]["errors"] == 0
    finally:
        srv.stop()


def test_max_adapters_unloads_the_least_recently_used_and_reloads_it(runs, tmp_path):
    adapters = AdapterSet({"pos": runs["pos"], "flip": runs["flip"]})
    srv = start(adapters, api_key=KEY, admin_key=ADMIN, adapter_dir=str(runs["weak"].parent), max_adapters=2)
    try:
        want = {n: call(f"{srv.url}/predict/{n}", texts_body(TEXTS[:3]))[1]["predictions"] for n in ("pos", "flip")}
        call(f"{srv.url}/predict/pos", texts_body(["good"]))  # flip is now the least recently used
        status, _ = call(f"{srv.url}/adapters", json.dumps({"name": "weak", "path": runs["weak"].name}).encode(), key=ADMIN)
        assert status == 201 and sorted(adapters.names) == ["pos", "weak"]
        listing = call(f"{srv.url}/adapters")[1]["adapters"]
        assert listing["flip"]["resident"] is False and listing["weak"]["resident"] is True
        status, answer = call(f"{srv.url}/predict/flip", texts_body(TEXTS[:3]))  # reloaded on demand; pos goes
        assert status == 200 and answer["predictions"] == want["flip"]
        assert sorted(adapters.names) == ["flip", "weak"]
        reloads = call(f"{srv.url}/metrics")[1]["library"]["reloads"]
        assert reloads["flip"]["count"] == 1 and reloads["flip"]["last_ms"] > 0
        assert call(f"{srv.url}/predict/pos", texts_body(TEXTS[:3]))[1]["predictions"] == want["pos"]
    finally:
        srv.stop()


def test_a_link_loop_in_a_runtime_folder_is_the_requests_problem(tmp_path):
    """Path.resolve raised RuntimeError("Symlink loop"): POST /adapters answered a plain-text 500."""
    from peft_ft.serving.library import LibraryError, allowed_run_dir

    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "loopy").symlink_to(tmp_path / "loop" / "loopy")
    (tmp_path / "self").symlink_to(tmp_path / "self")
    for path, shown in (("loop", "loopy"), ("self", "self")):
        with pytest.raises(LibraryError, match=rf"path '{path}': {shown} cannot be followed .*; fix or remove that link") as refused:
            allowed_run_dir(tmp_path, path)
        assert refused.value.status == 422


class LoadedSet:
    """What the Library asks of an AdapterSet: names, add and remove, with no model behind them."""

    def __init__(self, adapters: dict):
        self.adapters = dict(adapters)

    names = property(lambda self: list(self.adapters))

    def add(self, name, run_dir):
        self.adapters[name] = run_dir

    def remove(self, name):
        del self.adapters[name]


def test_max_adapters_holds_again_once_the_busy_adapter_is_done(tmp_path):
    """A load while every other resident adapter was busy went over --max-adapters, and it stayed over for good:
    only a load evicted, and never a busy adapter."""
    from peft_ft.serving.library import Library

    loaded = LoadedSet({"a": tmp_path})
    library = Library(loaded, {"a": str(tmp_path), "b": str(tmp_path)}, max_adapters=1)
    library.use("a")  # a long request on a
    library.use("b")  # b loads while a is busy: two resident
    assert sorted(loaded.names) == ["a", "b"]
    library.done("a")  # a, the least recently used, is idle now: unloaded
    assert loaded.names == ["b"] and library.snapshot()["resident"] == 1
    library.done("b")
    assert loaded.names == ["b"]


def test_a_delete_lets_the_requests_already_using_its_adapter_finish(runs):
    """Unloading under a request took its model and tokenizer away: a 404 when it waited for its batch, a 500
    (TypeError) when it was being tokenized. A DELETE now forgets the name at once and unloads after them."""
    adapters = AdapterSet({"pos": runs["pos"], "flip": runs["flip"]})
    srv = start(adapters, api_key=KEY, admin_key=ADMIN, adapter_dir=str(runs["flip"].parent.parent), max_wait_ms=1500)
    try:
        answer, finished = {}, {}

        def ask():
            answer.update(zip(("status", "body"), call(f"{srv.url}/predict/pos", texts_body(["good"]))))
            finished["answer"] = time.monotonic()

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.5)  # the request waits for its batch to fill
        assert call(f"{srv.url}/adapters/pos", method="DELETE", key=ADMIN)[0] == 200
        finished["delete"] = time.monotonic()
        asking.join(timeout=30)
        assert answer["status"] == 200 and answer["body"]["adapter"] == "pos", answer
        assert finished["answer"] <= finished["delete"]
        assert call(f"{srv.url}/predict/pos", texts_body(["good"])) == (404, {"error": "unknown adapter 'pos'; loaded: flip"})
        assert "pos" not in adapters.names
    finally:
        srv.stop()


def test_a_delete_unloads_only_once_the_last_request_using_it_is_done(tmp_path):
    """The audit's race, step by step: a DELETE that came while a request was tokenizing unloaded the model under it
    (500, TypeError). The name is forgotten at once; the unload waits for the requests already using it."""
    from peft_ft.serving.library import Library, LibraryError

    loaded = LoadedSet({"x": tmp_path})
    (tmp_path / "run").mkdir()
    library = Library(loaded, {"x": str(tmp_path)}, adapter_dir=str(tmp_path))
    library.use("x")  # a request is using x
    deleting = threading.Thread(target=library.remove, args=("x",), daemon=True)
    deleting.start()
    try:
        time.sleep(0.3)
        assert deleting.is_alive() and loaded.names == ["x"]  # waiting: the request still has its model
        with pytest.raises(LibraryError, match="unknown adapter 'x'; loaded: x"):  # but new requests are refused already
            library.use("x")
        with pytest.raises(LibraryError, match=r"already known \(being unloaded\)"):
            library.add("x", "run")
    finally:
        library.done("x")
    deleting.join(timeout=10)
    assert not deleting.is_alive() and loaded.names == [] and "x" not in library.known


def test_cli_sigterm_finishes_the_request_in_flight_and_exits_fast_with_idle_clients(runs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PEFT_FT_API_KEY": KEY}
    # a long batch wait keeps the request in flight while SIGTERM arrives
    process = subprocess.Popen(
        [sys.executable, "-m", "peft_ft", "serve", "--adapter", f"pos={runs['pos']}", "--port", "0", "--max-wait-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    idle = []
    try:
        line = process.stdout.readline()
        assert line.startswith("serving pos on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert call(f"{url}/adapters", key=None)[0] == 401
        host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
        slow_body = f"POST /predict/pos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{\"te".encode()
        for opening in (b"", b"GET /health HTTP/1.1\r\nHo", f"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode(), slow_body):
            # idle: nothing sent, half a request line, a finished keep-alive request, a body that stops coming
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(opening)
            idle.append(s)
        answer = {}
        asking = threading.Thread(target=lambda: answer.update(zip(("status", "body"), call(f"{url}/predict/pos", texts_body(["good"])))))
        asking.start()
        time.sleep(0.5)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        asking.join(timeout=30)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - signalled <= 5.0
        assert answer["status"] == 200 and answer["body"]["predictions"][0]["label"] in ("pos", "neg")
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/health", timeout=5)
    finally:
        for s in idle:
            s.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_schemathesis_fuzzing_of_the_openapi_schema_finds_no_500(adapters, tmp_path):
    """Requests generated from /openapi.json (examples, then random bodies, paths and headers): no 5xx, no crash."""
    srv = start(adapters, api_key=KEY, admin_key=ADMIN, adapter_dir=str(tmp_path), max_texts=8, max_tokens=2000)
    try:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{srv.url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "25", "--seed", "1", "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60", "--no-color"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its cache folder goes there, not into the repo
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert call(f"{srv.url}/health", key=None)[0] == 200 and sorted(adapters.names) == ["flip", "ner", "pos", "weak"]
    finally:
        srv.stop()


def test_unloading_the_last_adapter_of_a_base_ends_its_worker(runs):
    import gc
    import weakref

    adapters = AdapterSet({"pos": runs["pos"]})
    srv = start(adapters, api_key=KEY, admin_key=ADMIN, adapter_dir=str(runs["flip"].parent.parent))
    try:
        assert call(f"{srv.url}/predict/pos", texts_body(["good"]))[0] == 200
        model = weakref.ref(adapters.get("pos").group.model)
        [base] = srv.scheduler._bases.values()
        assert call(f"{srv.url}/adapters/pos", method="DELETE", key=ADMIN)[0] == 200
        base.thread.join(timeout=5)
        assert not base.thread.is_alive() and not srv.scheduler._bases
        gc.collect()
        assert model() is None  # nothing holds the unloaded model
    finally:
        srv.stop()


def test_cli_serves_a_stack_of_two_adapters_beside_them_and_removes_its_folder(runs, tmp_path):
    """`serve --combine both=pos:1,flip:1` (stacked updates, averaged heads) answers like the same combination made by
    `merge --combine ... --how cat` and served as a folder; the start-up folder is gone after SIGTERM."""
    from peft_ft.serving.combine import combine_runs

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "peft_ft", "serve", "--adapter", f"pos={runs['pos']}", "--adapter", f"flip={runs['flip']}",
         "--combine", "both=pos:1,flip:1", "--port", "0", "--max-adapters", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()  # every adapter named, the one over --max-adapters too
        assert line.startswith("serving pos, flip, both (pos unloaded by --max-adapters 2, loaded on first request) on "
                               "http://127.0.0.1:"), line
        url = line.split()[-1]
        assert list(tmp_path.glob("peft-ft-combined-*/both/adapter_model.safetensors"))
        status, body = call(f"{url}/predict/both", texts_body(TEXTS), key=None)
        assert status == 200, body
        folder = combine_runs([("pos", runs["pos"], 1.0), ("flip", runs["flip"], 1.0)], "cat", tmp_path / "made-by-merge")
        expected = AdapterSet({"m": folder}).answer("m", [{"text": t} for t in TEXTS])
        assert [p["label"] for p in body["predictions"]] == [e["label"] for e in expected]
        assert [p["score"] for p in body["predictions"]] == pytest.approx([e["score"] for e in expected], abs=1e-5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not list(tmp_path.glob("peft-ft-combined-*"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_cli_serve_on_a_taken_port_leaves_no_combination_folder(runs, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        done = subprocess.run([sys.executable, "-m", "peft_ft", "serve", "--adapter", f"pos={runs['pos']}", "--adapter",
                               f"flip={runs['flip']}", "--combine", "both=pos:1,flip:1", "--port", str(taken.getsockname()[1])],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    finally:
        taken.close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.glob("peft-ft-combined-*"))

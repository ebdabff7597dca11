"""`peft-ft serve` over a real socket on 127.0.0.1: keys, limits, names, batching, truncation, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from peft_ft.predict import AdapterSet
from peft_ft import serve
from peft_ft.serve import Batcher, Metrics, RequestError, freed_memory_releaser, make_server, request_rows
from test_predict import TEXTS, reference, train_ner, train_sentiment

KEY = "s3cret-key"
LIMITS = {"max_body": 4096, "max_texts": 8, "max_batch": 8, "max_wait_ms": 20}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("serve")
    return {"pos": train_sentiment(root, tiny_bert, "pos"), "flip": train_sentiment(root, tiny_bert, "flip", flip=True),
            "ner": train_ner(root, tiny_bert)}


def start(adapters, **settings):
    srv = make_server(adapters, "127.0.0.1", 0, **settings)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture(scope="module")
def server(runs):
    srv, thread, url = start(AdapterSet(runs), api_key=KEY, **LIMITS)
    yield url
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(url: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def texts_body(texts) -> bytes:
    return json.dumps({"texts": texts}).encode()


def test_both_adapters_answer_with_their_own_labels(server, runs):
    status, listing = call(f"{server}/adapters")
    assert status == 200 and set(listing["adapters"]) == {"pos", "flip", "ner"}
    assert listing["adapters"]["flip"]["labels"] == ["neg", "pos"] and listing["adapters"]["pos"]["pipeline_task"] == "text-classification"
    expected = {name: reference(runs[name], TEXTS) for name in ("pos", "flip")}
    for name in ["pos", "flip", "pos"]:
        status, answer = call(f"{server}/predict/{name}", texts_body(TEXTS[:LIMITS["max_texts"]]))
        assert status == 200 and answer["adapter"] == name
        assert [{k: p[k] for k in ("label", "score")} for p in answer["predictions"]] == expected[name]
        assert {p["truncated"] for p in answer["predictions"]} == {False}
    status, answer = call(f"{server}/predict/flip", json.dumps({"inputs": [{"text": TEXTS[0]}, TEXTS[1]]}).encode())
    assert status == 200 and [p["label"] for p in answer["predictions"]] == [e["label"] for e in expected["flip"][:2]]


def test_without_the_right_key_401_and_nothing_computed(server):
    def batches():
        return sum(a["batches"] for a in call(f"{server}/metrics")[1]["adapters"].values())

    before = batches()
    for key in (None, "wrong", KEY + "x", ""):
        status, error = call(f"{server}/predict/pos", texts_body(["good"]), key=key)
        assert status == 401 and "Authorization: Bearer" in error["error"]
        assert call(f"{server}/adapters", key=key)[0] == 401
        assert call(f"{server}/metrics", key=key)[0] == 401
    assert batches() == before  # no request reached the model
    assert call(f"{server}/health", key=None) == (200, {"status": "ok", "adapters": 3})


def test_limits_give_413_and_422_with_clear_messages(server):
    status, error = call(f"{server}/predict/pos", texts_body(["good film " * 100] * 6))  # ~6 KB > 4096
    assert status == 413 and "over this server's limit of 4096 bytes (--max-body-bytes)" in error["error"]
    status, error = call(f"{server}/predict/pos", texts_body([]))
    assert status == 422 and error["error"] == '"texts" is empty: send at least one'
    status, error = call(f"{server}/predict/pos", texts_body(["good"] * 9))
    assert status == 422 and "has 9 items; this server takes at most 8 per request (--max-texts)" in error["error"]
    assert call(f"{server}/predict/pos", texts_body(["good"] * 8))[0] == 200


def test_unknown_and_path_like_adapter_names_are_404_and_never_touch_the_disk(server, runs):
    opened = []
    watching = threading.Event()

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
            assert status == 404 and error["error"].startswith("unknown adapter") and error["error"].endswith("loaded: pos, flip, ner"), name
    finally:
        watching.clear()
    assert not [p for p in opened if "etc" in p or "passwd" in p or str(run_dir) in p or ".." in p], opened
    status, error = call(f"{server}/elsewhere")
    assert status == 404 and "/adapters" in error["error"]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    status, error = call(f"{server}/predict/pos", b'{"texts": ["good"')
    assert status == 400 and error["error"].startswith("body is not valid JSON")
    status, error = call(f"{server}/predict/pos", b'{"rows": ["good"]}')
    assert status == 400 and '"texts"' in error["error"]
    status, error = call(f"{server}/predict/pos", b'{"inputs": [{"sentence": "good"}]}')
    assert status == 400 and "inputs[0]: expected a text field 'text'" in error["error"]
    status, answer = call(f"{server}/predict/pos", b'{"texts": ["good"]}')
    assert status == 200 and answer["predictions"][0]["label"] in ("pos", "neg")


def test_concurrent_single_text_requests_get_their_own_adapters_answer(server):
    """Each text sent alone first, then all (adapter, text) pairs at once from many threads: the
    batches mix requests, and every answer must still be its own adapter's."""
    pairs = [(name, text) for name in ("pos", "flip") for text in TEXTS] * 2
    alone = {(n, t): call(f"{server}/predict/{n}", texts_body([t]))[1]["predictions"][0] for n, t in set(pairs)}
    assert sum(alone[("pos", t)]["label"] != alone[("flip", t)]["label"] for t in TEXTS) >= len(TEXTS) - 1
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
        assert got["score"] == pytest.approx(alone[(name, text)]["score"], abs=1e-4)  # padding in a batch: float noise only
    metrics = call(f"{server}/metrics")[1]
    assert metrics["adapters"]["pos"]["requests"] >= len(pairs) // 2 and metrics["adapters"]["pos"]["p99_ms"] >= metrics["adapters"]["pos"]["p50_ms"] > 0
    assert metrics["errors"].get("401", 0) >= 0 and metrics["requests"] > len(pairs)


def test_a_long_ner_text_is_truncated_with_the_flag(server):
    long_text = "mary lives in london . " + "the film was good . " * 120  # ~600 tokens: over the 512 positions of the model
    status, answer = call(f"{server}/predict/ner", texts_body([long_text, "john works in paris ."]))
    assert status == 200, answer
    cut, short = answer["predictions"]
    assert cut["truncated"] is True and short["truncated"] is False
    assert all(e["end"] <= 200 for e in cut["entities"])  # only the first model.max_length (32) tokens were read
    assert ("PER", "john") in {(e["entity_group"], e["word"]) for e in short["entities"]}


class FakeAdapters:
    """An AdapterSet stand-in recording each batch; the first call waits until released."""

    names = ["a", "b"]

    def __init__(self):
        self.calls, self.release, self.started = [], threading.Event(), threading.Event()

    def run_inputs(self, name, inputs):
        self.calls.append((name, list(inputs)))
        self.started.set()
        self.release.wait(timeout=10)
        if "boom" in inputs:
            raise ValueError("boom")
        return [{"adapter": name, "echo": item} for item in inputs]


def test_batcher_groups_waiting_requests_per_adapter_and_isolates_failures():
    fake = FakeAdapters()
    batcher = Batcher(fake, Metrics(fake.names), max_batch=4, max_wait_ms=1)
    answers, lock = {}, threading.Lock()

    def submit(name, inputs):
        try:
            result = batcher.submit(name, inputs)
        except ValueError as e:
            result = str(e)
        with lock:
            answers[(name, tuple(inputs))] = result

    first = threading.Thread(target=submit, args=("a", ["x0"]))
    first.start()
    assert fake.started.wait(5)  # the worker of "a" is busy with x0: the next requests queue up
    jobs = [("a", ["x1"]), ("a", ["x2", "boom"]), ("b", ["y1"]), ("a", ["x3"]), ("a", ["x4", "x5"])]
    threads = [threading.Thread(target=submit, args=job) for job in jobs]
    for t in threads:
        t.start()
        time.sleep(0.05)  # queued in this order
    fake.release.set()
    for t in [first, *threads]:
        t.join(timeout=10)
    assert answers[("a", ("x1",))] == [{"adapter": "a", "echo": "x1"}]
    assert answers[("a", ("x2", "boom"))] == "boom"
    assert answers[("a", ("x4", "x5"))] == [{"adapter": "a", "echo": "x4"}, {"adapter": "a", "echo": "x5"}]
    assert answers[("b", ("y1",))] == [{"adapter": "b", "echo": "y1"}]
    a_calls = [inputs for name, inputs in fake.calls if name == "a"]
    # one batch of the queued x1, x2+boom, x3 (4 texts), retried one request at a time after the failure
    assert a_calls[:5] == [["x0"], ["x1", "x2", "boom", "x3"], ["x1"], ["x2", "boom"], ["x3"]]
    assert a_calls[5:] == [["x4", "x5"]]  # held back: it would have made the batch 6 texts
    assert all(name == "b" for name, inputs in fake.calls if "y1" in inputs)


def test_batcher_releases_freed_memory_after_every_batch(monkeypatch):
    """The allocator is trimmed after each batch, failed ones included (the fix of RSS growing under load)."""
    released = []
    monkeypatch.setattr(serve, "freed_memory_releaser", lambda: lambda: released.append(1))
    fake = FakeAdapters()
    fake.release.set()
    batcher = Batcher(fake, Metrics(fake.names), max_batch=4, max_wait_ms=1)
    assert batcher.submit("a", ["x"]) == [{"adapter": "a", "echo": "x"}]
    with pytest.raises(ValueError):
        batcher.submit("b", ["boom"])
    deadline = time.monotonic() + 5
    while len(released) < 2 and time.monotonic() < deadline:  # the release follows the answer
        time.sleep(0.01)
    assert len(released) == 2 and len(fake.calls) == 2
    freed_memory_releaser()()  # the real one runs here (malloc_trim on glibc, a no-op elsewhere)


def test_metrics_keep_a_bounded_latency_window(monkeypatch):
    monkeypatch.setattr(serve, "LATENCY_WINDOW", 50)
    metrics = Metrics(["a"])
    for i in range(500):
        metrics.request("a", 200, i / 1000, texts=1)
    assert len(metrics.adapters["a"]["latency"]) == 50
    snap = metrics.snapshot()["adapters"]["a"]
    assert snap["requests"] == 500 and snap["texts"] == 500 and snap["p50_ms"] >= 450  # the window holds the latest


def test_request_rows_shapes():
    assert request_rows(b'{"texts": ["a", "b"]}') == ([{"text": "a"}, {"text": "b"}], ["texts[0]", "texts[1]"])
    assert request_rows(b'{"inputs": [{"question": "q", "context": "c"}]}')[0] == [{"question": "q", "context": "c"}]
    for body, message, status in [(b'[1]', "JSON object", 400), (b'{"texts": []}', "is empty", 422), (b'{"texts": [{"text": "a"}]}', "texts[0] is dict", 400),
                                  (b'{"texts": ["a"], "inputs": ["b"]}', "one of", 400), (b"\xff", "not valid JSON", 400),
                                  (b'{"texts": ["a", "b", "c"]}', "at most 2 per request", 422)]:
        with pytest.raises(RequestError, match=re.escape(message)) as caught:
            request_rows(body, max_texts=2)
        assert caught.value.status == status


def test_cli_serve_needs_its_key_and_sigterm_finishes_the_request_in_flight(runs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PEFT_FT_API_KEY": KEY}
    # a long batch wait keeps the request in flight while SIGTERM arrives
    process = subprocess.Popen(
        [sys.executable, "-m", "peft_ft", "serve", "--adapter", f"pos={runs['pos']}", "--port", "0", "--max-wait-ms", "2500"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving pos on http://127.0.0.1:"), line
        url = line.split()[-1]
        assert call(f"{url}/adapters", key=None)[0] == 401
        status, listing = call(f"{url}/adapters")
        assert status == 200 and list(listing["adapters"]) == ["pos"]
        answer = {}
        asking = threading.Thread(target=lambda: answer.update(zip(("status", "body"), call(f"{url}/predict/pos", texts_body(["good"])))))
        started = time.monotonic()
        asking.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        asking.join(timeout=30)
        assert process.wait(timeout=30) == 0
        assert answer["status"] == 200 and answer["body"]["predictions"][0]["label"] in ("pos", "neg")
        assert time.monotonic() - started >= 2.0  # it was answered after the signal, by the batch wait's end
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

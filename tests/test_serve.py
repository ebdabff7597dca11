"""`peft-ft serve`: hot-swapping adapters over a real socket on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from peft_ft.predict import AdapterSet
from peft_ft.serve import RequestError, make_server, request_rows
from test_predict import TEXTS, reference, train_sentiment


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("serve")
    return {"pos": train_sentiment(root, tiny_bert, "pos"), "flip": train_sentiment(root, tiny_bert, "flip", flip=True)}


@pytest.fixture(scope="module")
def server(runs):
    srv = make_server(AdapterSet(runs), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_both_adapters_answer_with_their_own_labels(server, runs):
    status, listing = call(f"{server}/adapters")
    assert status == 200 and set(listing["adapters"]) == {"pos", "flip"}
    assert listing["adapters"]["flip"]["labels"] == ["neg", "pos"] and listing["adapters"]["pos"]["pipeline_task"] == "text-classification"
    expected = {name: reference(d, TEXTS) for name, d in runs.items()}
    for name in ["pos", "flip", "pos"]:
        status, answer = call(f"{server}/predict/{name}", json.dumps({"texts": TEXTS}).encode())
        assert status == 200 and answer["adapter"] == name
        assert [{k: p[k] for k in ("label", "score")} for p in answer["predictions"]] == expected[name]
    status, answer = call(f"{server}/predict/flip", json.dumps({"inputs": [{"text": TEXTS[0]}, TEXTS[1]]}).encode())
    assert status == 200 and [p["label"] for p in answer["predictions"]] == [e["label"] for e in expected["flip"][:2]]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    status, error = call(f"{server}/predict/nope", b'{"texts": ["good"]}')
    assert status == 404 and error["error"] == "unknown adapter 'nope'; loaded: pos, flip"
    status, error = call(f"{server}/predict/pos", b'{"texts": ["good"')
    assert status == 400 and error["error"].startswith("body is not valid JSON")
    status, error = call(f"{server}/predict/pos", b'{"rows": ["good"]}')
    assert status == 400 and '"texts"' in error["error"]
    status, error = call(f"{server}/predict/pos", b'{"inputs": [{"sentence": "good"}]}')
    assert status == 400 and "inputs[0]: expected a text field 'text'" in error["error"]
    status, error = call(f"{server}/elsewhere")
    assert status == 404 and "GET /adapters" in error["error"]
    status, answer = call(f"{server}/predict/pos", b'{"texts": ["good"]}')
    assert status == 200 and answer["predictions"][0]["label"] in ("pos", "neg")


def test_concurrent_requests_to_both_adapters_keep_their_answers(server, runs):
    expected = {name: [e["label"] for e in reference(d, TEXTS)] for name, d in runs.items()}
    results, errors = [], []

    def ask(name):
        try:
            status, answer = call(f"{server}/predict/{name}", json.dumps({"texts": TEXTS}).encode())
            results.append((name, status, [p["label"] for p in answer["predictions"]]))
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(name,)) for name in ["pos", "flip"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 8
    assert all(status == 200 and labels == expected[name] for name, status, labels in results)


def test_request_rows_shapes():
    assert request_rows(b'{"texts": ["a", "b"]}') == ([{"text": "a"}, {"text": "b"}], ["texts[0]", "texts[1]"])
    assert request_rows(b'{"inputs": [{"question": "q", "context": "c"}]}')[0] == [{"question": "q", "context": "c"}]
    for body, message in [(b'[1]', "JSON object"), (b'{"texts": []}', "non-empty list"), (b'{"texts": [{"text": "a"}]}', "texts[0] is dict"),
                          (b'{"texts": ["a"], "inputs": ["b"]}', "one of"), (b"\xff", "not valid JSON")]:
        with pytest.raises(RequestError, match=re.escape(message)) as caught:
            request_rows(body)
        assert caught.value.status == 400


def test_cli_serve_picks_a_free_port_and_prints_it(runs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "peft_ft", "serve", "--adapter", f"pos={runs['pos']}", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving pos on http://127.0.0.1:"), (line, process.stderr.read() if process.poll() is not None else "")
        url = line.split()[-1]
        status, listing = call(f"{url}/adapters")
        assert status == 200 and list(listing["adapters"]) == ["pos"]
    finally:
        process.terminate()
        process.wait(timeout=30)

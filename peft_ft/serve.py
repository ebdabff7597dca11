"""`peft-ft serve`: the adapters of `peft-ft predict` behind a small HTTP server.

    GET  /health               -> {"status": "ok", "adapters": N}            (no key needed)
    GET  /adapters             -> {"adapters": {name: {task, pipeline_task, method, base_model, labels, run_dir}}}
    GET  /metrics              -> requests served, errors by status, per adapter: requests, errors, texts,
                                  batches, p50/p99 latency (ms) over the last LATENCY_WINDOW requests
    POST /predict/{adapter}    body {"texts": ["...", ...]} or {"inputs": [{...} or "...", ...]}
                               -> {"adapter": name, "predictions": [{"adapter": name, ..., "truncated": bool}, ...]}

Standard library `http.server.ThreadingHTTPServer`, not FastAPI + uvicorn: the server routes four
paths to `AdapterSet`, and an ASGI stack would add two dependencies and no throughput (torch uses
the cores for one batch anyway).

Safe defaults: it binds 127.0.0.1 unless `--host` says otherwise; with an API key (`--api-key` or
$PEFT_FT_API_KEY) every path but /health needs `Authorization: Bearer KEY` (401 otherwise, checked
before the body is read, compared in constant time). A body over `max_body` bytes gets 413 and is
never parsed; an empty list or more than `max_texts` texts gets 422. Adapters are looked up by name
in the table loaded at start: a request never names a path, so nothing it sends is read from disk.

Batching: each adapter has a queue and a worker thread. The worker takes the oldest request, waits
up to `max_wait_ms` for more requests to the same adapter (up to `max_batch` texts), and answers
them in one pipeline call with that adapter active; adapters sharing a base take turns on its lock,
so a batch never runs with another adapter's weights. A failed batch is retried request by request:
one bad request does not fail its neighbours.

Errors are JSON: 400 bad body, 401 no or wrong key, 404 unknown adapter or path, 411 no
Content-Length, 413 body too large, 422 empty or too many texts, 500 failure inside the model; the
server keeps serving after each. SIGTERM (and Ctrl-C) stops accepting, lets the requests in flight
finish, and exits 0.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from peft_ft.allocator import freed_memory_releaser
from peft_ft.errors import PeftFtError

log = logging.getLogger("peft_ft")
API_KEY_ENV = "PEFT_FT_API_KEY"
MAX_BODY = 1024 * 1024  # bytes; a few thousand sentences
MAX_TEXTS = 256  # per request
MAX_BATCH = 32  # texts per batched pipeline call
MAX_WAIT_MS = 5.0  # how long a batch waits for more requests to its adapter
LATENCY_WINDOW = 10_000  # latencies kept per adapter for p50/p99: memory stays flat under load
DRAIN_TIMEOUT = 60.0  # seconds SIGTERM waits for requests in flight
NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def request_rows(body: bytes, max_texts: int = MAX_TEXTS) -> tuple[list[dict], list[str]]:
    """Rows and their names (`inputs[3]`) from a request body, or a RequestError saying what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not (("texts" in data) ^ ("inputs" in data)):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object with one of "texts" (a list of strings) or "inputs" (a list of objects)')
    key = "texts" if "texts" in data else "inputs"
    items = data[key]
    if not isinstance(items, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, f'"{key}" must be a list')
    if not items:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f'"{key}" is empty: send at least one')
    if len(items) > max_texts:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f'"{key}" has {len(items)} items; this server takes at most {max_texts} '
                                                            f"per request (--max-texts): split the request")
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            rows.append({"text": item})
        elif isinstance(item, dict) and key == "inputs":
            rows.append(item)
        else:
            want = "a string" if key == "texts" else "an object or a string"
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{key}[{i}] is {type(item).__name__}; expected {want}")
    return rows, [f"{key}[{i}]" for i in range(len(rows))]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


class Metrics:
    """Counters and recent latencies, per adapter; every method is thread-safe."""

    def __init__(self, names: list[str]):
        self._lock = threading.Lock()
        self.requests, self.errors = 0, {}
        self.adapters = {n: {"requests": 0, "errors": 0, "texts": 0, "batches": 0, "latency": deque(maxlen=LATENCY_WINDOW)} for n in names}

    def request(self, adapter: str | None, status: int, seconds: float, texts: int = 0) -> None:
        with self._lock:
            self.requests += 1
            if status >= 400:
                self.errors[str(status)] = self.errors.get(str(status), 0) + 1
            stats = self.adapters.get(adapter)
            if stats is not None:
                stats["requests"] += 1
                stats["errors"] += status >= 400
                stats["texts"] += texts if status < 400 else 0
                stats["latency"].append(seconds)

    def batch(self, adapter: str) -> None:
        with self._lock:
            self.adapters[adapter]["batches"] += 1

    def snapshot(self) -> dict:
        with self._lock:
            per = {}
            for name, s in self.adapters.items():
                latency = list(s["latency"])
                p50, p99 = percentile(latency, 0.5), percentile(latency, 0.99)
                per[name] = {k: s[k] for k in ("requests", "errors", "texts", "batches")} | {
                    "p50_ms": None if p50 is None else round(1000 * p50, 3), "p99_ms": None if p99 is None else round(1000 * p99, 3)}
            return {"requests": self.requests, "errors": dict(self.errors), "adapters": per}


class Batcher:
    """One queue and one worker thread per adapter: concurrent requests to an adapter share a pipeline call."""

    def __init__(self, adapters, metrics: Metrics, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS):
        self.adapters, self.metrics = adapters, metrics
        self.max_batch, self.max_wait = max(1, max_batch), max(0.0, max_wait_ms) / 1000
        self.queues = {name: queue.Queue() for name in adapters.names}
        self._release = freed_memory_releaser()
        for name in adapters.names:
            threading.Thread(target=self._work, args=(name,), name=f"batch-{name}", daemon=True).start()

    def submit(self, name: str, inputs: list) -> list[dict]:
        """Answers of adapter `name` for pipeline inputs, once a batch holding them has run."""
        future: Future = Future()
        self.queues[name].put((inputs, future))
        return future.result()

    def _work(self, name: str) -> None:
        jobs_queue, held = self.queues[name], None
        while True:
            first, held = held or jobs_queue.get(), None
            jobs, size = [first], len(first[0])
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                try:
                    job = jobs_queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if size + len(job[0]) > self.max_batch:
                    held = job  # starts the next batch
                    break
                jobs.append(job)
                size += len(job[0])
            self._run(name, jobs)
            self._release()

    def _run(self, name: str, jobs: list) -> None:
        try:
            outputs = self.adapters.run_inputs(name, [item for inputs, _ in jobs for item in inputs])
        except Exception as e:
            if len(jobs) > 1:  # find the request that fails; its neighbours still get their answers
                for job in jobs:
                    self._run(name, [job])
            else:
                jobs[0][1].set_exception(e)
            return
        self.metrics.batch(name)
        start = 0
        for inputs, future in jobs:
            future.set_result(outputs[start:start + len(inputs)])
            start += len(inputs)


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that counts the requests in flight, so a shutdown can wait for them."""

    daemon_threads = True  # a stuck client does not keep the process alive past the drain timeout
    request_queue_size = 128  # listen backlog; socketserver's 5 resets connections of a burst of clients

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._idle = threading.Condition()
        self._busy = 0

    def process_request(self, request, client_address):
        with self._idle:
            self._busy += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Wait until no request is in flight; False if some still were after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)


def make_handler(adapters, batcher: Batcher, metrics: Metrics, api_key: str | None, max_body: int, max_texts: int):
    """A request handler class bound to one loaded `AdapterSet` and the server's settings."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "peft-ft"
        timeout = 30  # seconds: a client that stops sending mid-request frees its thread

        def do_GET(self):
            path = urlsplit(self.path).path.rstrip("/")
            if path == "/health":
                return self._send(HTTPStatus.OK, {"status": "ok", "adapters": len(adapters.names)})
            if not self._authorized():
                return self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong API key: send the header 'Authorization: Bearer KEY'"})
            if path == "/adapters":
                return self._send(HTTPStatus.OK, {"adapters": adapters.describe()})
            if path == "/metrics":
                return self._send(HTTPStatus.OK, metrics.snapshot())
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}; use GET /health, /adapters, /metrics or POST /predict/{{adapter}}"})

        def do_POST(self):
            start, name, texts = time.monotonic(), None, 0
            self._body_read = False
            try:
                name, rows = self._request()
                texts = len(rows)
                status, payload = HTTPStatus.OK, {"adapter": name, "predictions": batcher.submit(name, rows)}
            except RequestError as e:
                status, payload = e.status, {"error": str(e)}
            except PeftFtError as e:  # a row the adapter cannot read (missing field...)
                status, payload = HTTPStatus.BAD_REQUEST, {"error": str(e)}
            except Exception as e:  # a bug or a model failure: report it, keep serving
                log.exception("request %s failed", self.path)
                status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"}
            if not self._body_read:
                self._discard_body()
            self._send(status, payload)
            metrics.request(name, status, time.monotonic() - start, texts)

        def _request(self) -> tuple[str, list]:
            """The adapter name and its pipeline inputs, or a RequestError; nothing runs before the key is checked."""
            if not self._authorized():
                raise RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
            path, prefix = urlsplit(self.path).path, "/predict/"
            if not path.startswith(prefix):
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such path {path}; use POST /predict/{{adapter}}")
            name = path[len(prefix):].rstrip("/")
            # Matched against the table loaded at start, never decoded or joined to a path.
            if not NAME.match(name) or name not in adapters.names:
                raise RequestError(HTTPStatus.NOT_FOUND, f"unknown adapter {name!r}; loaded: {', '.join(adapters.names)}")
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length header (chunked bodies are not taken)")
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
            if length > max_body:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes is over this server's limit of "
                                                                        f"{max_body} bytes (--max-body-bytes): split the request")
            body, self._body_read = self.rfile.read(length), True
            rows, where = request_rows(body, max_texts)
            return name, adapters.inputs(name, rows, where)

        def _authorized(self) -> bool:
            if expected is None:
                return True
            given = self.headers.get("Authorization", "").encode("utf-8", "replace")
            return hmac.compare_digest(given, expected)

        def _discard_body(self) -> None:
            """Read (and drop) a body we answer without using, up to a bound, so the client reads our
            answer instead of a connection reset; the connection is closed after the answer."""
            self.close_connection = True
            try:
                left = min(int(self.headers.get("Content-Length") or 0), 4 * max_body + 65536)
                while left > 0:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
            except (OSError, ValueError):
                pass

        def _send(self, status: HTTPStatus, payload: dict):
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # to our log, not raw stderr
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(adapters, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None, max_body: int = MAX_BODY,
                max_texts: int = MAX_TEXTS, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS) -> Server:
    """A server bound to host:port (0 = a free port: read it from `server.server_address`), not yet serving."""
    metrics = Metrics(adapters.names)
    handler = make_handler(adapters, Batcher(adapters, metrics, max_batch, max_wait_ms), metrics, api_key, max_body, max_texts)
    try:
        server = Server((host, port), handler)
    except OSError as e:
        raise PeftFtError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (0 picks a free one)") from None
    server.metrics = metrics
    return server


def stop_on_signals(server: Server) -> None:
    """SIGTERM and SIGINT stop the accept loop; requests in flight finish (see `run_serve`)."""

    def stop(signum, frame):
        # shutdown() waits for serve_forever to return: call it from another thread than the loop's
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_serve(adapter_args: list[str], host: str, port: int, batch_size: int, device: str = "cpu", *, api_key: str | None = None,
              allow_pickle: bool = False, trust_remote_code: bool = False, max_body: int = MAX_BODY, max_texts: int = MAX_TEXTS, max_batch: int = MAX_BATCH,
              max_wait_ms: float = MAX_WAIT_MS) -> int:
    """`peft-ft serve`: load every adapter, then serve until SIGTERM or Ctrl-C; requests in flight finish."""
    from peft_ft.log import setup_logging
    from peft_ft.predict import AdapterSet, parse_adapter_args

    setup_logging()  # request lines on the console
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the models "
                    "(set --api-key or $%s)", host, API_KEY_ENV)
    adapters = AdapterSet(parse_adapter_args(adapter_args), device, batch_size, allow_pickle, trust_remote_code)
    server = make_server(adapters, host, port, api_key=api_key, max_body=max_body, max_texts=max_texts,
                         max_batch=max_batch, max_wait_ms=max_wait_ms)
    stop_on_signals(server)
    bound_host, bound_port = server.server_address[:2]
    # flushed at once: a script that started us with --port 0 reads the port from this line
    print(f"serving {', '.join(adapters.names)} on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
        drained = server.drain()
    finally:
        server.server_close()
    print("stopped" if drained else f"stopped; requests still in flight after {DRAIN_TIMEOUT:.0f} s were dropped", file=sys.stderr, flush=True)
    return 0

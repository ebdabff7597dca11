"""The HTTP side of `peft-ft serve`: FastAPI routes over the `Library` and `Scheduler`, behind a guard.

The guard (`Guard`, plain ASGI, in front of FastAPI) runs before any route and before any body byte is
read: the Host check (without an API key only this machine's names are answered, 403 otherwise: a web
page cannot reach the server through DNS rebinding), the keys (401, compared in constant time), the
body's size (411 without a Content-Length, 413 over --max-body-bytes; a negative or non-numeric
Content-Length never gets this far: the HTTP parser answers 400) and its read timeout (408), and
OPTIONS (204 with the methods of that path, 404 for no route). Everything else is FastAPI's: request bodies are checked
against `schemas` (422 naming the field), and the same models make `/openapi.json` and `/docs`.
Every error is JSON `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from collections import deque

from fastapi import Body, FastAPI, Path, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from peft_ft.data.files import strict_json
from peft_ft.errors import PeftFtError
from peft_ft.serving import schemas
from peft_ft.serving.library import LibraryError
from peft_ft.serving.scheduler import DeadlineExceeded, Job

log = logging.getLogger("peft_ft")
LATENCY_WINDOW = 10_000  # latencies kept per adapter for p50/p99: memory stays flat under load
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
OPEN_PATHS = {"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}  # answered without a key
# The scripts and styles of /docs and /redoc, served from the fastapi-offline package: FastAPI's own pages fetch them
# from cdn.jsdelivr.net, and rendered blank wherever the browser has no internet.
DOCS_ASSETS = "/docs-assets"


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


class Metrics:
    """Counters and recent latencies, per adapter; every method is thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests, self.errors, self.mixed_batches, self.batches = 0, {}, 0, 0
        self.adapters: dict[str, dict] = {}

    def _stats(self, name: str) -> dict:
        return self.adapters.setdefault(name, {"requests": 0, "errors": 0, "texts": 0, "batches": 0, "latency": deque(maxlen=LATENCY_WINDOW)})

    def response(self, status: int) -> None:
        """One answered request, whoever answered it (Guard's refusals and the schema's 422s included)."""
        with self._lock:
            self.requests += 1
            if status >= 400:
                self.errors[str(status)] = self.errors.get(str(status), 0) + 1

    def request(self, adapter: str, status: int, seconds: float, texts: int = 0) -> None:
        """One /predict request of a known adapter (its share of the counters and its latency)."""
        with self._lock:
            stats = self._stats(adapter)
            stats["requests"] += 1
            stats["errors"] += status >= 400
            stats["texts"] += texts if status < 400 else 0
            stats["latency"].append(seconds)

    def batch(self, names: list[str]) -> None:
        with self._lock:
            self.batches += 1
            self.mixed_batches += len(set(names)) > 1
            for name in set(names):
                self._stats(name)["batches"] += 1

    def snapshot(self) -> dict:
        with self._lock:
            per = {}
            for name, s in self.adapters.items():
                latency = list(s["latency"])
                p50, p99 = percentile(latency, 0.5), percentile(latency, 0.99)
                per[name] = {k: s[k] for k in ("requests", "errors", "texts", "batches")} | {
                    "p50_ms": None if p50 is None else round(1000 * p50, 3), "p99_ms": None if p99 is None else round(1000 * p99, 3)}
            return {"requests": self.requests, "errors": dict(self.errors), "batches": self.batches, "mixed_batches": self.mixed_batches,
                    "adapters": per}


DRAIN_SECONDS = 1.0  # how long a refused request's body is read before its connection closes anyway


class Guard:
    """ASGI middleware: Host, keys, body size and read timeout, OPTIONS; see the module docstring."""

    def __init__(self, app, *, api_key: str | None, admin_key: str | None, max_body: int, body_timeout: float, bound_host: str,
                 metrics: Metrics | None = None):
        self.app, self.max_body, self.body_timeout, self.metrics = app, max_body, body_timeout, metrics
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        self.admin_key = f"Bearer {admin_key}".encode() if admin_key else None
        self.hosts = LOCAL_HOSTS | {bound_host.lower()}
        self.stopping = lambda: False  # set by the server: True once SIGTERM came (a slow body is then not waited for)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.metrics is not None and scope["path"] not in UNCOUNTED and not _open(scope["path"]):
            send = _counted(send, self.metrics)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:  # a body left unread would be taken for the next request: such connections close
            close = scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
            # A client that waits for "100 Continue" (curl, for bodies over 1 MB) has sent no body: reading would make
            # uvicorn invite it, and the refusal then closed on a body in flight ("Connection reset by peer").
            if close and b"100-continue" not in headers.get("expect", b"").lower():
                await self._drain(receive)
            return await _answer(send, *refusal, close=close)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await _read_body(receive, self.max_body, time.monotonic() + self.body_timeout, self.stopping)
            except _Slow:
                if self.stopping():
                    return await _answer(send, 503, "the server is shutting down: send the request again", close=True)
                return await _answer(send, 408, f"the body did not arrive within {self.body_timeout:.0f} s", close=True)
            except _TooLarge:
                return await _answer(send, 413, f"body over this server's limit of {self.max_body} bytes (--max-body-bytes): split the request", close=True)
            if body is None:  # the client went away
                return
            problem = _json_problem(body)
            if problem:
                return await _answer(send, 400, problem)
            receive = _replay(body, receive)
            # Every body here is JSON: `curl -d` sends a form content type, and FastAPI would then not parse it.
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"] + [(b"content-type", b"application/json")]}
        if scope["method"] == "HEAD":  # a GET without its body; the routes (and /docs) list GET only
            scope, send = {**scope, "method": "GET"}, _headers_only(send)
        await self.app(scope, receive, send)

    async def _drain(self, receive) -> None:
        """Read (and drop) a refused request's body if it comes at once, up to the body limit, before the
        connection closes. Without it, Schemathesis' refused `POST /adapters` (API key, not the admin key) was
        now and then read by the client as a broken response ("Connection reset by peer"): 4 of 14 runs of
        tests/test_serve.py's fuzzing test, none in 8 with it. A body that is slow or too large is not waited for."""
        try:
            await _read_body(receive, self.max_body, time.monotonic() + DRAIN_SECONDS, self.stopping)
        except (_Slow, _TooLarge):
            pass

    def _allowed(self, path: str) -> list[str]:
        """The methods the routes matching `path` take (HEAD with GET, as __call__ answers it), in a fixed order."""
        methods = set()
        for route in getattr(self.app, "routes", []):
            if getattr(route, "methods", None) and route.path_regex.match(path):
                methods |= route.methods
        if "GET" in methods:
            methods.add("HEAD")
        return [m for m in ("GET", "HEAD", "POST", "DELETE") if m in methods]

    def _refusal(self, scope, headers: dict) -> tuple | None:
        method, path = scope["method"], scope["path"]
        # Without an API key the predict routes are open: only to pages and programs addressing this machine.
        if self.api_key is None and _host_name(headers.get("host", b"")) not in self.hosts:
            return 403, "this server answers only requests addressed to this machine (Host: localhost or 127.0.0.1); set an API key to serve other names"
        if method == "OPTIONS":
            allowed = self._allowed(path)
            if not allowed:
                return 404, f"no route {path}: see /openapi.json for the routes"
            return 204, None, {"allow": ", ".join([*allowed, "OPTIONS"])}
        given = headers.get("authorization", b"")
        admin = self.admin_key is not None and hmac.compare_digest(given, self.admin_key)
        if path.rstrip("/") == "/adapters" and method == "POST" or path.startswith("/adapters/") and method == "DELETE":
            if self.admin_key is None:
                return 403, "runtime loading is off: start the server with --admin-key (or $PEFT_FT_ADMIN_KEY) and --adapter-dir"
            if not admin:
                return 401, "missing or wrong admin key: send the header 'Authorization: Bearer ADMIN_KEY'", {"www-authenticate": "Bearer"}
        elif not _open(path) and self.api_key is not None and not admin and not hmac.compare_digest(given, self.api_key):
            return 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", {"www-authenticate": "Bearer"}
        if method in ("POST", "PUT", "PATCH"):
            if b"chunked" in headers.get("transfer-encoding", b"").lower() or "content-length" not in headers:
                return 411, "send the body with a Content-Length header (chunked bodies are not taken)"
            if int(headers["content-length"]) > self.max_body:  # the HTTP parser let only digits through
                return 413, f"body of {int(headers['content-length'])} bytes is over this server's limit of {self.max_body} bytes (--max-body-bytes): split the request"
        return None


def _json_problem(body: bytes) -> str | None:
    """What the JSON parser behind FastAPI would take silently: a key twice in one object (the last wins), NaN or
    Infinity (answered back as invalid JSON). Bodies that are no JSON at all are FastAPI's to describe."""
    try:
        strict_json(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    except ValueError as e:
        return f"body: {e}"
    return None


class _TooLarge(Exception):
    pass


class _Slow(Exception):
    pass


async def _read_body(receive, limit: int, until: float, stopping) -> bytes | None:
    """The whole body (None if the client left), or _TooLarge, or _Slow past `until` or once `stopping()`."""
    chunks, size = [], 0
    while True:
        task = asyncio.ensure_future(receive())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and (stopping() or time.monotonic() > until):
                task.cancel()
                raise _Slow()
        message = task.result()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: a disconnect, when it comes

    return replay


def _headers_only(send):
    async def send_head(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


# GET /metrics counts every request but these: probes and documentation pages would drown the traffic
UNCOUNTED = OPEN_PATHS | {"/metrics"}


def _counted(send, metrics: Metrics):
    """`send` that counts the response's status once it starts (401, 411, 413 and 422 never reach a route)."""
    async def send_counted(message):
        if message["type"] == "http.response.start":
            metrics.response(message["status"])
        await send(message)
    return send_counted


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[:text.find("]") + 1] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


async def _answer(send, status: int, message: str | None, headers: dict | None = None, close: bool = False) -> None:
    body = b"" if message is None else json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:  # the rest of an unread body would be taken for the next request
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"www-authenticate": "Bearer"} if status == 401 else None)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return 400, f"body is not valid JSON: {errors[0].get('ctx', {}).get('error', 'decode error')} at character {errors[0]['loc'][-1]}"
    unicode = next((e for e in errors if e.get("type") == "string_unicode"), None)
    if unicode is not None:  # pydantic's JSON parser refuses a lone UTF-16 surrogate in some fields: the same 400 as the others
        where = ".".join(str(p) for p in unicode.get("loc", ()) if p != "body") or "body"
        return 400, f"{where}: holds a lone UTF-16 surrogate, not text; send UTF-8 (a \\uD800-\\uDFFF escape must be one half of a pair)"
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg')}")
    return 422, "; ".join(parts) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")


ANSWER_ERRORS = {401: {"model": schemas.ErrorResponse, "description": "no or wrong key"},
                 403: {"model": schemas.ErrorResponse, "description": "Host not this machine (no key set)"},
                 413: {"model": schemas.ErrorResponse, "description": "body or tokens over the limit"},
                 422: {"model": schemas.ErrorResponse, "description": "a field is wrong"}}


def create_app(library, scheduler, metrics: Metrics, *, max_texts: int, max_tokens: int, deadline_s: float) -> FastAPI:
    """The FastAPI application: routes only; wrap it in `Guard` before serving."""
    # redirect_slashes off: `/predict/ner/` got an empty 307 to the path without the slash (a client that does not
    # follow it for a POST saw no answer); now the 404 below names the routes.
    app = FastAPIOffline(static_url=DOCS_ASSETS, title="peft-ft serve", version="2", redirect_slashes=False, description=(
        "Trained peft-ft adapters over HTTP. `POST /predict/{adapter}` with `{\"text\": ...}`, `{\"texts\": [...]}` or "
        "`{\"inputs\": [{...}]}` (the fields of the adapter's task family: see the examples). Send `Authorization: Bearer KEY` "
        "when the server has a key. Errors are `{\"error\": \"...\"}`."))
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key (checked before the route runs)")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # e.g. nested deeper than the parser goes
            message = "body could not be parsed as JSON (not UTF-8, or nested too deeply): send a UTF-8 JSON object with \"text\", \"texts\" or \"inputs\""
        if exc.status_code == 404:
            message = f"no such path {request.url.path}; see /docs: GET /health, /adapters, /metrics; POST /predict/{{adapter}}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error(*_validation_message(exc))

    @app.api_route("/health", methods=["GET"], response_model=schemas.HealthResponse, tags=["server"])
    async def health():
        """Liveness; no key needed."""
        return {"status": "ok", "adapters": len(library.adapters.names)}

    @app.api_route("/adapters", methods=["GET"], response_model=schemas.AdaptersResponse, tags=["adapters"],
                   dependencies=[Security(bearer)], responses=ANSWER_ERRORS)
    async def adapters():
        """Every known adapter: task, method, base model, label names, whether it is loaded now and whether it mixes."""
        return {"adapters": await run_in_threadpool(library.describe)}

    @app.api_route("/metrics", methods=["GET"], tags=["server"], dependencies=[Security(bearer)], responses=ANSWER_ERRORS)
    async def get_metrics():
        """Requests, errors by status, batches (mixed: more than one adapter in a forward), per adapter p50/p99 (ms), reloads."""
        return {**metrics.snapshot(), "library": library.snapshot()}

    @app.post("/adapters", status_code=201, tags=["adapters"], responses=ANSWER_ERRORS | {409: {"model": schemas.ErrorResponse}})
    async def load(body: schemas.LoadRequest):
        """Load a run folder from inside --adapter-dir (admin key)."""
        try:
            run_dir = await run_in_threadpool(library.add, body.name, body.path)
        except LibraryError as e:
            return error(e.status, str(e))
        except PeftFtError as e:
            return error(422, f"{body.path}: {e}")
        return {"loaded": body.name, "run_dir": str(run_dir)}

    @app.delete("/adapters/{name}", tags=["adapters"], responses=ANSWER_ERRORS)
    async def unload(name: str):
        """Unload an adapter and forget it (admin key)."""
        try:
            await run_in_threadpool(library.remove, name)
        except LibraryError as e:
            return error(e.status, str(e))
        return {"unloaded": name}

    @app.post("/predict/{adapter}", response_model=schemas.PredictResponse, tags=["predict"], dependencies=[Security(bearer)],
              responses=ANSWER_ERRORS | {400: {"model": schemas.ErrorResponse, "description": "body is not JSON, or a row lacks its family's field"},
                                         404: {"model": schemas.ErrorResponse, "description": "unknown adapter"},
                                         504: {"model": schemas.ErrorResponse, "description": "past the request deadline"}})
    async def predict(adapter: str = Path(description="name of a loaded adapter (GET /adapters)", examples=list(library.known)[:3] or ["my_adapter"]),
                      body: schemas.PredictRequest = Body(openapi_examples=schemas.PREDICT_EXAMPLES)):
        """Answers of one adapter, one per text or row, in order."""
        start, status, texts = time.monotonic(), 200, 0
        try:
            texts, answer = await _predict(adapter, body)
        except LibraryError as e:
            status, answer = e.status, {"error": str(e)}
        except _Refused as e:
            status, answer = e.status, {"error": str(e)}
        except DeadlineExceeded:
            status, answer = 504, {"error": f"not answered within the request deadline of {deadline_s:g} s (--request-timeout); send fewer or shorter texts"}
        except PeftFtError as e:  # a row the adapter cannot read (a missing field...)
            status, answer = 400, {"error": str(e)}
            if NAME.fullmatch(adapter) and adapter not in library.known:  # DELETE /adapters/NAME came while it waited
                status, answer = 404, {"error": f"adapter {adapter!r} was removed (DELETE /adapters/{adapter}) while this request "
                                                f"waited; servable: {', '.join(library.known) or 'none'}"}
        except Exception as e:  # a bug or a model failure: reported, and the server keeps serving
            log.exception("request /predict/%s failed", adapter)
            status, answer = 500, {"error": f"internal error ({type(e).__name__}); the server's log has the details"}
        if adapter in library.known:
            metrics.request(adapter, status, time.monotonic() - start, texts)
        return JSONResponse(answer, status_code=status)

    async def _predict(name: str, body: schemas.PredictRequest) -> tuple[int, dict]:
        # Matched against the table of known adapters, never decoded or joined to a path.
        if not NAME.fullmatch(name) or name not in library.known:
            raise LibraryError(404, f"unknown adapter {name!r}; loaded: {', '.join(library.known) or 'none'}")
        rows, where = body.rows()
        kind = "texts" if body.texts is not None else "inputs"
        if not rows:
            raise _Refused(422, f'"{kind}" is empty: send at least one')
        if len(rows) > max_texts:
            raise _Refused(422, f'"{kind}" has {len(rows)} items; this server takes at most {max_texts} per request (--max-texts): split the request')
        await run_in_threadpool(library.use, name)  # loads it again if --max-adapters had unloaded it
        try:
            inputs = library.adapters.inputs(name, rows, where)
            costs = await run_in_threadpool(scheduler.costs, name, inputs)
            if sum(costs) > max_tokens:
                raise _Refused(413, f"this request is {sum(costs)} tokens after tokenization (texts up to the run's max_length, every window of a "
                                    f"QA context); this server takes at most {max_tokens} per request (--max-tokens): split it")
            job = Job(name, inputs, costs, time.monotonic() + deadline_s)
            try:
                results = await asyncio.wait_for(asyncio.wrap_future(scheduler.submit(job)), deadline_s)
            except asyncio.TimeoutError:
                job.give_up()  # the worker drops its remaining rows
                raise DeadlineExceeded() from None
        finally:
            library.done(name)
        # a row's `id` is copied to its answer, as `predict` does: a client matching answers to its own records
        results = [{**({"id": row["id"]} if "id" in row else {}), **answer} for row, answer in zip(rows, results)]
        return len(rows), {"adapter": name, "predictions": results}

    return app


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

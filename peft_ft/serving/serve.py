"""`peft-ft serve`: the adapters of `peft-ft predict` over HTTP, on FastAPI + uvicorn.

    GET    /health              liveness (no key)                  GET  /docs, /openapi.json   the API, documented
    GET    /adapters            every known adapter                GET  /metrics               counters, p50/p99, reloads
    POST   /predict/{adapter}   {"text": ...} | {"texts": [...]} | {"inputs": [{...}]}  -> {"adapter", "predictions": [...]}
    POST   /adapters            {"name", "path"}: load from --adapter-dir (admin key)
    DELETE /adapters/{name}     unload (admin key)

The parts live in `peft_ft.serving` (schemas, scheduler, library, app). Safe defaults: it binds
127.0.0.1; without an API key it answers only requests addressed to this machine (Host check, 403);
with one (`--api-key` or $PEFT_FT_API_KEY) every path but /health and the docs needs
`Authorization: Bearer KEY` (401, checked before the body is read). Bounded work: --max-body-bytes
(413), --max-texts (422), --max-tokens per request after tokenization (413), --request-timeout (504;
the worker drops the rest of the request), batches of at most --max-batch-tokens. Connections: a
request's headers must arrive within HEADER_TIMEOUT and its body within BODY_TIMEOUT; idle
keep-alive connections close after KEEP_ALIVE. SIGTERM (and Ctrl-C) stops accepting, closes idle
connections at once, lets requests in flight finish (at most --request-timeout more), exits 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.log import setup_logging
from peft_ft.serving.combine import build_inference_combinations, parse_inference_combinations
from peft_ft.serving.library import Library
from peft_ft.serving.predict import AdapterSet, parse_adapter_args
from peft_ft.serving.scheduler import Scheduler

log = logging.getLogger("peft_ft")
API_KEY_ENV = "PEFT_FT_API_KEY"
ADMIN_KEY_ENV = "PEFT_FT_ADMIN_KEY"
MAX_BODY = 1024 * 1024  # bytes; a few thousand sentences
MAX_TEXTS = 256  # per request
MAX_BATCH = 32  # rows per forward
MAX_BATCH_TOKENS = 4096  # tokens per forward: a batch stays well under a second of CPU for a MiniLM-sized model
MAX_TOKENS = 8192  # per request, after tokenization; 16384 MiniLM tokens (64 texts x 256) took 18 s on the shared 2-core machine under load
REQUEST_TIMEOUT = 30.0  # seconds from arrival to answer
MAX_WAIT_MS = 5.0  # how long a batch waits for more requests
HEADER_TIMEOUT = 10.0  # seconds for a request's headers
BODY_TIMEOUT = 30.0  # seconds for its body
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open


def _protocol():
    """uvicorn's h11 protocol with a header timeout: uvicorn has none, so a client sending half a
    request line would hold its connection (and delay shutdown) for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def data_received(self, data):
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete and self.header_timer is not None:
                self.header_timer.cancel()  # the headers are in: the body has its own timeout (Guard)
                self.header_timer = None

        def connection_lost(self, exc):
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(HEADER_TIMEOUT, self._too_slow)

        def _too_slow(self):
            self.header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


class Server:
    """A bound socket, the app and its uvicorn server: `serve()` blocks; `url` is known before."""

    def __init__(self, app, sock: socket.socket, graceful_s: float):
        import uvicorn

        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        config = uvicorn.Config(app, http=_protocol(), lifespan="off", log_level="warning", access_log=False,
                                timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=int(graceful_s) + 1)
        self.uvicorn = uvicorn.Server(config)

    def serve(self) -> None:
        import signal

        # uvicorn re-raises the signal that stopped it once it is done; handled here, the process exits 0
        main = threading.current_thread() is threading.main_thread()  # signals belong to the main thread (tests serve from others)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start(self) -> threading.Thread:
        """Serve from a thread (tests); `stop()` ends it."""
        thread = threading.Thread(target=self.serve, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def make_server(adapters, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None, admin_key: str | None = None,
                adapter_dir: str | None = None, max_adapters: int | None = None, max_body: int = MAX_BODY,
                max_texts: int = MAX_TEXTS, max_batch: int = MAX_BATCH, max_batch_tokens: int = MAX_BATCH_TOKENS,
                max_tokens: int = MAX_TOKENS, request_timeout: float = REQUEST_TIMEOUT, max_wait_ms: float = MAX_WAIT_MS,
                mix: bool = True, started: dict | None = None) -> Server:
    """A server for a loaded `AdapterSet`, bound to host:port (0 = a free port: read `server.url`), not yet serving."""
    # Here, not at the top: FastAPI and pydantic take about a second to import, and `run_serve` reports a
    # mistake in its arguments or adapter folders before that.
    from peft_ft.serving.app import Guard, Metrics, create_app

    metrics = Metrics()
    library = Library(adapters, started or {a.name: a.run_dir for a in adapters.adapters.values()}, adapter_dir, max_adapters)
    scheduler = Scheduler(adapters, metrics, max_batch_tokens=max_batch_tokens, max_batch=max_batch, max_wait_ms=max_wait_ms, mix=mix)
    library.on_unload = scheduler.prune
    app = create_app(library, scheduler, metrics, max_texts=max_texts, max_tokens=max_tokens, deadline_s=request_timeout)
    guarded = Guard(app, api_key=api_key, admin_key=admin_key, max_body=max_body, body_timeout=BODY_TIMEOUT, bound_host=host,
                    metrics=metrics)
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
    except OSError as e:
        raise PeftFtError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (0 picks a free one)") from None
    server = Server(guarded, sock, request_timeout)
    guarded.stopping = lambda: server.uvicorn.should_exit
    server.metrics, server.library, server.scheduler = metrics, library, scheduler
    return server


def run_serve(adapter_args: list[str], host: str, port: int, batch_size: int, device: str = "cpu", *, api_key: str | None = None,
              admin_key: str | None = None, adapter_dir: str | None = None, max_adapters: int | None = None, allow_pickle: bool = False,
              trust_remote_code: bool = False, max_body: int = MAX_BODY, max_texts: int = MAX_TEXTS, max_batch: int = MAX_BATCH,
              max_batch_tokens: int = MAX_BATCH_TOKENS, max_tokens: int = MAX_TOKENS, request_timeout: float = REQUEST_TIMEOUT,
              max_wait_ms: float = MAX_WAIT_MS, mix: bool = True, combine: list[str] = (), how: str = "cat",
              density: float | None = None) -> int:
    """`peft-ft serve`: load every adapter, then serve until SIGTERM or Ctrl-C; requests in flight finish,
    then the process exits 0 (it does not return). `combine`: adapters stacked or averaged at start-up
    (peft_ft.serving.combine), served under their own names."""
    setup_logging()
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    if admin_key and not adapter_dir:
        raise PeftFtError("--admin-key loads adapters at runtime from --adapter-dir: give --adapter-dir DIR too")
    if adapter_dir and not os.path.isdir(adapter_dir):
        raise PeftFtError(f"--adapter-dir {adapter_dir}: no such folder")
    if max_adapters is not None and max_adapters < 1:
        raise PeftFtError(f"--max-adapters {max_adapters}: give 1 or more")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the models "
                    "(set --api-key or $%s)", host, API_KEY_ENV)
    specs = parse_adapter_args(adapter_args)
    combined = parse_inference_combinations(list(combine), specs, how, density)
    # the combined folders live as long as the server: removed before the process exits below
    workdir = Path(tempfile.mkdtemp(prefix="peft-ft-combined-"))
    try:
        specs |= build_inference_combinations(combined, how, density, workdir, allow_pickle)
        adapters = AdapterSet(specs, device, batch_size, allow_pickle, trust_remote_code)
        server = make_server(adapters, host, port, api_key=api_key, admin_key=admin_key, adapter_dir=adapter_dir,
                             max_adapters=max_adapters, max_body=max_body, max_texts=max_texts, max_batch=max_batch,
                             max_batch_tokens=max_batch_tokens, max_tokens=max_tokens, request_timeout=request_timeout,
                             max_wait_ms=max_wait_ms, mix=mix, started=specs)
    except BaseException:  # a refused adapter, a port in use: nothing of this start stays behind
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    # flushed at once: a script that started us with --port 0 reads the port from this line
    unloaded = [n for n in server.library.known if n not in adapters.names]  # over --max-adapters: loaded on demand
    later = f" ({', '.join(unloaded)} unloaded by --max-adapters {max_adapters}, loaded on first request)" if unloaded else ""
    print(f"serving {', '.join(server.library.known)}{later} on {server.url}", flush=True)
    print(f"API documentation: {server.url}/docs", file=sys.stderr, flush=True)
    server.serve()  # uvicorn handles SIGTERM/SIGINT: stop accepting, close idle connections, finish requests in flight
    print("stopped", file=sys.stderr, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.flush()
    # Every request is answered; tearing down the interpreter (torch, the loaded models) took 3-4 s more on
    # a busy machine, past the 5 s a supervisor gives after SIGTERM. Nothing is left to write.
    os._exit(0)

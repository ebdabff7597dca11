"""`peft-ft serve`: the adapters of `peft-ft predict` behind a small HTTP server.

    GET  /adapters             -> {"adapters": {name: {task, pipeline_task, method, base_model, labels, run_dir}}}
    POST /predict/{adapter}    body {"texts": ["...", ...]} or {"inputs": [{...} or "...", ...]}
                               -> {"adapter": name, "predictions": [{"adapter": name, ...answer}, ...]}

Standard library `http.server.ThreadingHTTPServer`, not FastAPI + uvicorn: the server only routes two
paths to `AdapterSet`, which already serialises requests per model (the active adapter is model state,
and torch uses every core for one batch anyway), so an ASGI stack would add two dependencies and no
throughput. Errors are JSON: 400 for a bad body, 404 for an unknown adapter or path, 413 for a body
over MAX_BODY, 500 for a failure inside the model; the server keeps serving after each. It binds
127.0.0.1 unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import json
import logging
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from peft_ft.errors import PeftFtError

log = logging.getLogger("peft_ft")
MAX_BODY = 16 * 1024 * 1024


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def request_rows(body: bytes) -> tuple[list[dict], list[str]]:
    """Rows and their names (`inputs[3]`) from a request body, or a RequestError saying what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not (("texts" in data) ^ ("inputs" in data)):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object with one of "texts" (a list of strings) or "inputs" (a list of objects)')
    key = "texts" if "texts" in data else "inputs"
    items = data[key]
    if not isinstance(items, list) or not items:
        raise RequestError(HTTPStatus.BAD_REQUEST, f'"{key}" must be a non-empty list')
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


def make_handler(adapters):
    """A request handler class bound to one loaded `AdapterSet`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "peft-ft"

        def do_GET(self):
            if self.path.rstrip("/") == "/adapters":
                return self._send(HTTPStatus.OK, {"adapters": adapters.describe()})
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; use GET /adapters or POST /predict/{{adapter}}"})

        def do_POST(self):
            try:
                self._send(HTTPStatus.OK, self._predict())
            except RequestError as e:
                self._send(e.status, {"error": str(e)})
            except PeftFtError as e:  # a row the adapter cannot read (missing field...)
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # a bug or a model failure: report it, keep serving
                log.exception("request %s failed", self.path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

        def _predict(self) -> dict:
            prefix = "/predict/"
            if not self.path.startswith(prefix):
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such path {self.path}; use POST /predict/{{adapter}}")
            name = self.path[len(prefix):].strip("/")
            if name not in adapters.names:
                raise RequestError(HTTPStatus.NOT_FOUND, f"unknown adapter {name!r}; loaded: {', '.join(adapters.names)}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes is over the limit of {MAX_BODY}")
            rows, where = request_rows(self.rfile.read(length))
            return {"adapter": name, "predictions": adapters.answer(name, rows, where)}

        def _send(self, status: HTTPStatus, payload: dict):
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # to our log, not raw stderr
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(adapters, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server bound to host:port (0 = a free port: read it from `server.server_address`), not yet serving."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(adapters))
    except OSError as e:
        raise PeftFtError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (0 picks a free one)") from None
    server.daemon_threads = True  # a stuck client does not keep the process alive at shutdown
    return server


def run_serve(adapter_args: list[str], host: str, port: int, batch_size: int, device: str = "cpu") -> int:
    """`peft-ft serve`: load every adapter, then serve until interrupted."""
    from peft_ft.log import setup_logging
    from peft_ft.predict import AdapterSet, parse_adapter_args

    setup_logging()  # request lines on the console
    adapters = AdapterSet(parse_adapter_args(adapter_args), device, batch_size)
    server = make_server(adapters, host, port)
    bound_host, bound_port = server.server_address[:2]
    # flushed at once: a script that started us with --port 0 reads the port from this line
    print(f"serving {', '.join(adapters.names)} on http://{bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0

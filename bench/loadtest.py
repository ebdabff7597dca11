"""Load test of `peft-ft serve`: concurrent clients on 127.0.0.1, mixed adapters, some malformed requests.

    python bench/loadtest.py --smoke                                 # tiny BERT adapters trained here, ~1 min
    python bench/loadtest.py --adapter a=RUN_DIR --adapter b=RUN_DIR --clients 16 --seconds 60
    python bench/loadtest.py --compare --adapter a=adapters/grading_lora --adapter b=adapters/grading_lora \
        --adapter c=adapters/grading_lora --adapter d=adapters/grading_lora --seconds 20   # mixed vs single vs --no-mix

`--compare` runs the same load three times, each on a fresh server: spread over every adapter given
(rows of LoRA adapters on one base share forwards), all to the first adapter, and spread over every
adapter with `--no-mix` (each forward one adapter: the switching of serve v1); it prints one table
(requests/s, texts/s, p50/p99, RSS at start/middle/end, differing answers, unexpected statuses).

Starts the server as a subprocess (`peft-ft serve --port 0`, an API key in $PEFT_FT_API_KEY), asks
every (adapter, text) pair alone first (the reference answers), then runs `--clients` threads for at
most `--seconds` and `--max-requests`. Each request is, at random, 1-4 texts for a random adapter, or
(`--bad` of them) a malformed one with a known expected status (bad JSON and JSON nested 50,000 deep
400, no key 401, unknown or path-like adapter 404, empty list 422, and over raw sockets: Content-Length
-1 400, a huge Content-Length 413 answered without waiting for the body, chunked 411, HEAD 200, OPTIONS 204). Reports requests/s, p50/p99 latency, statuses, answers that
differ from the reference (a label, entity or text that differs, or a score off by more than 1e-4:
batching pads inputs together, which moves scores by float noise only), and the server's RSS over
the load (sampled every `--rss-every` seconds) with its growth in the first and in the second half:
a server that keeps memory bounded may grow in the first half (caches and allocator pools filling)
but not in the second. Ends the server with SIGTERM and reports its exit status.
Exit status 1 when an answer differs or a status was not the expected one. Text-input adapters only
(classification, NER, seq2seq); QA adapters are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import non_negative_float, non_negative_int, positive_float, positive_int, run_main

HOST = "127.0.0.1"  # never anything else: this script loads a machine on purpose
SCORE_TOLERANCE = 1e-4
IDLE_SECONDS = 2.0  # wait after the load before the idle RSS sample
TEXTS = [
    "the plant needs water and light", "it is not the answer", "john lives in paris", "mary works at acme corp",
    "the student said on monday", "google works in london", "energy from the sun", "it is the reference answer because",
    "plant " * 300,  # over model.max_length: answered truncated, with the flag
]
PAIR_TEXT = "the plant needs water and light to grow"  # second text for pair classifiers (grading, NLI)
PAIRED: set[str] = set()  # adapters that answered "expected a text field 'text_pair'": they get pairs


def payload(name: str, texts: list[str]) -> bytes:
    if name in PAIRED:
        return json.dumps({"inputs": [{"text": t, "text_pair": PAIR_TEXT} for t in texts]}).encode()
    return json.dumps({"texts": texts}).encode()


POSITIVE = ["water", "light", "grow", "energy", "sun"]
NEGATIVE = ["not", "because", "said", "monday", "is"]


def train_smoke_adapters(root: Path, more: bool = False) -> dict[str, str]:
    """Two classification adapters that disagree (one learns flipped labels) and one NER adapter, on a
    2-layer hidden-32 BERT: seconds each. `more`: two more classification adapters (other seeds), so
    that four share one base (for --compare)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import SMOKE_WORDS, write_smoke_inputs

    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe

    model_dir, data_dir = write_smoke_inputs(root)
    rng = random.Random(0)
    runs = {}
    classifiers = (("pos", False), ("flip", True)) + ((("pos2", False), ("flip2", True)) if more else ())
    for name, flip in classifiers:
        rows = []
        for i in range(64):
            good = i % 2 == 0
            words = [rng.choice(SMOKE_WORDS) for _ in range(rng.randint(1, 6))] + [rng.choice(POSITIVE if good else NEGATIVE)]
            rows.append({"text": " ".join(words), "label": "pos" if good != flip else "neg"})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    specs = {name: f'[data]\ndir = "{root}"\ntrain = "{name}.jsonl"\n[train]\nepochs = 30\nbatch_size = 16\nlr = 1e-2\nseed = {40 + i}\n'
             for i, (name, _) in enumerate(classifiers)}
    specs["ner"] = f'[task]\ntype = "ner"\n[data]\ndir = "{data_dir}"\ntrain = "conll2003/train.txt"\n[train]\nepochs = 10\nbatch_size = 16\nlr = 1e-2\n'
    for name, spec in specs.items():
        recipe = root / f"{name}.toml"
        recipe.write_text(f'[model]\nname = "{model_dir}"\nmax_length = 64\n{spec}threads = 1\n[output]\ndir = "{root / "runs"}"\nname = "{name}"\n',
                          encoding="utf-8")
        runs[name] = str(run(load_recipe(recipe)))
    return runs


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """Samples a process's RSS every `every` seconds until stopped: (seconds since start, MiB) pairs."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.stopped = pid, every, threading.Event()
        self.started = time.monotonic()
        self.samples: list[tuple[float, float]] = [(0.0, rss_mib(pid))]

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.samples.append((time.monotonic() - self.started, rss_mib(self.pid)))

    def stop(self) -> list[tuple[float, float]]:
        self.stopped.set()
        self.join()
        self.samples.append((time.monotonic() - self.started, rss_mib(self.pid)))
        return self.samples


def rss_report(samples: list[tuple[float, float]]) -> list[str]:
    """The RSS samples, and the growth over the first and the second half of the load (the sample
    nearest the middle splits them): a bounded server may grow in the first half, not in the second."""
    start, end = samples[0], samples[-1]
    middle = min(samples, key=lambda s: abs(s[0] - end[0] / 2))
    first, second = middle[1] - start[1], end[1] - middle[1]
    grew = second > max(20.0, 0.05 * start[1])
    return [f"server RSS (s: MiB): {', '.join(f'{t:.0f}: {m:.0f}' for t, m in samples)}",
            f"server RSS growth: first half {first:+.1f} MiB ({start[1]:.0f} -> {middle[1]:.0f}), second half {second:+.1f} MiB "
            f"({middle[1]:.0f} -> {end[1]:.0f}){'; GREW in the second half' if grew else ''}"]


def call(url: str, body: bytes | None = None, key: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def start_server(adapters: dict[str, str], key: str, args, log_path: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "peft_ft", "serve", "--host", HOST, "--port", "0", "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms), "--batch-size", str(args.max_batch), "--device", args.device] + (["--no-mix"] if args.no_mix else [])
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "PEFT_FT_API_KEY": key, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    # stderr (a log line per request) to a file: a pipe nobody reads would fill and stall the server
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True, env=env)
    line = process.stdout.readline()  # "serving NAMES on URL"
    if not line.startswith("serving "):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}; see {log_path}")
    # its log (a line per request) goes on to stdout: keep reading it, or the full pipe stalls the server
    threading.Thread(target=copy_lines, args=(process.stdout, log_path.with_suffix(".out")), daemon=True).start()
    return process, line.split()[-1]


def raw_status(url: str, request: bytes, timeout: float = 10) -> int:
    """Status of the answer to raw request bytes on a new connection (599 when none came)."""
    import socket

    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        first = s.recv(64)
    try:
        return int(first.split()[1])
    except (IndexError, ValueError):
        return 599


def idle_clients(url: str, key: str) -> list:
    """Three connections that hold still when SIGTERM comes: one that sent nothing, one half a request
    line, one a body that stops after a few bytes (the server must still exit within seconds)."""
    import socket

    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    openings = [b"", b"GET /health HTTP/1.1\r\nHo",
                f"POST /predict/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n{{\"te".encode()]
    sockets = []
    for opening in openings:
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(opening)
        sockets.append(s)
    time.sleep(0.3)
    return sockets


def copy_lines(stream, path: Path) -> None:
    with path.open("w") as out:
        for line in stream:
            out.write(line)


def same_answer(got: dict, want: dict) -> bool:
    """Equal, except scores (anywhere in the answer) may differ by float noise."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            abs(got[k] - want[k]) <= SCORE_TOLERANCE if k == "score" else same_answer(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same_answer(g, w) for g, w in zip(got, want))
    return got == want


def malformed(names: list[str], key: str) -> list[tuple[str, str, bytes | None, str | None, int]]:
    """(what, path, body, key, expected status) of the bad requests mixed into the load; a path
    starting with "RAW " is sent as raw bytes on its own connection (the body is the whole request)."""
    one = json.dumps({"texts": ["water"]}).encode()
    auth = f"Authorization: Bearer {key}\r\n".encode()
    head = f"POST /predict/{names[0]} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + auth
    return [
        ("bad JSON", f"/predict/{names[0]}", b'{"texts": ["water"', key, 400),
        ("JSON nested 50,000 deep", f"/predict/{names[0]}", b"[" * 50_000 + b"]" * 50_000, key, 400),
        ("Content-Length -1", "RAW", head + b"Content-Length: -1\r\n\r\n", None, 400),
        ("Content-Length 10^13, no body sent", "RAW", head + b"Content-Length: 10000000000000\r\n\r\n", None, 413),
        ("chunked body", "RAW", head + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", None, 411),
        ("HEAD /health", "RAW", b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", None, 200),
        ("OPTIONS", "RAW", f"OPTIONS /predict/{names[0]} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(), None, 204),
        ("no key", f"/predict/{names[0]}", one, None, 401),
        ("wrong key", f"/predict/{names[0]}", one, key + "x", 401),
        ("unknown adapter", "/predict/nope", one, key, 404),
        ("path-like adapter", "/predict/..%2F..%2Fetc%2Fpasswd", one, key, 404),
        ("empty list", f"/predict/{names[0]}", json.dumps({"texts": []}).encode(), key, 422),
    ]


class Load:
    """What the client threads record, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}
        self.statuses: dict[str, int] = {}
        self.unexpected: list[str] = []
        self.mismatches: list[str] = []
        self.requests = 0
        self.texts = 0  # answered

    def record(self, adapter: str, status: int, seconds: float, problem: str | None = None, mismatch: str | None = None):
        with self.lock:
            self.latency.setdefault(adapter, []).append(seconds)
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if problem:
                self.unexpected.append(problem)
            if mismatch:
                self.mismatches.append(mismatch)


def client(seed: int, url: str, key: str, reference: dict, bad: list, args, load: Load, deadline: float) -> None:
    rng = random.Random(seed)
    names = sorted({name for name, _ in reference})
    while time.monotonic() < deadline:
        with load.lock:
            if load.requests >= args.max_requests:
                return
            load.requests += 1
        if rng.random() < args.bad:
            what, path, body, use_key, want = rng.choice(bad)
            start = time.monotonic()
            try:
                status = raw_status(url, body) if path == "RAW" else call(url + path, body, use_key)[0]
            except OSError:
                status = 599
            load.record("(malformed)", status, time.monotonic() - start, None if status == want else f"{what}: {status}, expected {want}")
            continue
        name = rng.choice(names)
        texts = rng.sample(TEXTS, rng.randint(1, 4))
        start = time.monotonic()
        try:
            status, answer = call(f"{url}/predict/{name}", payload(name, texts), key)
        except OSError as e:
            load.record(name, 599, time.monotonic() - start, f"{name}: {type(e).__name__}: {e}")
            continue
        seconds = time.monotonic() - start
        if status != 200:
            load.record(name, status, seconds, f"{name}: {status} {answer.get('error')}")
            continue
        with load.lock:
            load.texts += len(texts)
        wrong = next((f"{name}: {t[:30]!r}: {p} != {reference[(name, t)]}" for t, p in zip(texts, answer["predictions"])
                      if not same_answer(p, reference[(name, t)])), None)
        load.record(name, status, seconds, mismatch=wrong)


def percentiles_ms(values: list[float]) -> str:
    ordered = sorted(values)
    pick = lambda q: 1000 * ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]
    return f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms" if ordered else "-"


def run_phase(adapters: dict[str, str], args, workdir: Path, use: list[str] | None = None) -> dict:
    """Start a server with `adapters`, take the reference answers, run the load (to the adapters in
    `use`, default all but QA ones), stop the server; what was measured, and the report lines."""
    key = secrets.token_hex(16)
    process, url = start_server(adapters, key, args, workdir / f"server-{len(list(workdir.glob('server-*.log')))}.log")
    try:
        listing = call(f"{url}/adapters", key=key)[1]["adapters"]
        names = use or [n for n, a in listing.items() if a["pipeline_task"] != "question-answering"]
        described = ", ".join(f"{n} ({listing[n]['pipeline_task']}{', mixes' if listing[n].get('mixes') else ''})" for n in names)
        print(f"server pid {process.pid} on {url}{' --no-mix' if args.no_mix else ''}; load to: {described}", flush=True)
        reference = {}
        for name in names:  # every input alone: the answers the load must reproduce
            for text in TEXTS:
                status, answer = call(f"{url}/predict/{name}", payload(name, [text]), key)
                if status == 400 and "text_pair" in str(answer.get("error")) and name not in PAIRED:
                    PAIRED.add(name)  # a pair classifier: send every text with a second one
                    status, answer = call(f"{url}/predict/{name}", payload(name, [text]), key)
                if status != 200:
                    raise SystemExit(f"reference answer of {name} failed: {status} {answer}")
                reference[(name, text)] = answer["predictions"][0]
        truncated = sorted({n for (n, _), a in reference.items() if a.get("truncated")})
        load, bad = Load(), malformed(names, key)
        before = call(f"{url}/metrics", key=key)[1]  # the reference answers' forwards are not the load's
        sampler = RssSampler(process.pid, args.rss_every or max(0.5, args.seconds / 8))
        sampler.start()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [threading.Thread(target=client, args=(args.seed + i, url, key, reference, bad, args, load, deadline), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.seconds + 120)
        elapsed = time.monotonic() - started
        rss = sampler.stop()
        time.sleep(IDLE_SECONDS)  # no batch in flight: what the server keeps, not what a batch uses
        idle_rss = rss_mib(process.pid)
        metrics = call(f"{url}/metrics", key=key)[1]
    finally:
        idle = idle_clients(url, key) if process.poll() is None else []
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            exit_status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_status = "killed after 60 s"
        exit_seconds = time.monotonic() - signalled
        for s in idle:
            s.close()

    served = sum(load.statuses.values())
    good = [s for n, v in load.latency.items() if n != "(malformed)" for s in v]
    lines = [f"{served} requests by {args.clients} clients in {elapsed:.1f} s: {served / elapsed:.1f} requests/s, "
             f"{load.texts / elapsed:.1f} texts/s answered; well-formed requests: {percentiles_ms(good)}"]
    for name, values in sorted(load.latency.items()):
        server_side = metrics["adapters"].get(name)
        extra = f"; server: {server_side['batches']} batches for {server_side['requests']} requests, p50 {server_side['p50_ms']} ms, p99 {server_side['p99_ms']} ms" if server_side else ""
        lines.append(f"  {name}: {len(values)} requests, {percentiles_ms(values)}{extra}")
    forwards, mixed = metrics["batches"] - before["batches"], metrics["mixed_batches"] - before["mixed_batches"]
    lines.append(f"server forwards during the load: {forwards}, of them mixing adapters: {mixed}")
    lines.append(f"statuses: {', '.join(f'{k}: {v}' for k, v in sorted(load.statuses.items()))}; server counted {metrics['requests']} requests, errors {metrics['errors']}")
    lines.append(f"unexpected statuses: {len(load.unexpected)}" + "".join(f"\n  {p}" for p in load.unexpected[:10]))
    lines.append(f"answers differing from the same input sent alone: {len(load.mismatches)}" + "".join(f"\n  {m}" for m in load.mismatches[:10]))
    lines.append(f"adapters answering the long text truncated (flagged): {', '.join(truncated) or 'none'}")
    lines += rss_report(rss) + [f"server RSS {IDLE_SECONDS:.0f} s after the load (idle): {idle_rss:.1f} MiB",
                                f"server exit status after SIGTERM with 3 idle slow clients: {exit_status} ({exit_seconds:.1f} s)"]
    middle = min(rss, key=lambda r: abs(r[0] - rss[-1][0] / 2))
    return {"lines": lines, "requests_s": served / elapsed, "texts_s": load.texts / elapsed, "latency": good, "rss": (rss[0][1], middle[1], rss[-1][1]),
            "ok": not load.unexpected and not load.mismatches and exit_status == 0, "mismatches": len(load.mismatches),
            "unexpected": len(load.unexpected), "mixed_batches": mixed, "batches": forwards}


def compare_table(results: dict[str, dict]) -> str:
    """The three phases side by side, as markdown."""
    def pick(values: list[float], q: float) -> str:
        ordered = sorted(values)
        return f"{1000 * ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]:.0f}" if ordered else "-"

    rows = ["| load | requests/s | texts/s | texts/s of each run | p50 ms | p99 ms | forwards (mixed) | RSS MiB start / middle / end | differing answers | unexpected statuses |",
            "|---|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for label, r in results.items():
        rows.append(f"| {label} | {r['requests_s']:.1f} | {r['texts_s']:.1f} | {', '.join(f'{t:.0f}' for t in r.get('per_run', [r['texts_s']]))} | "
                    f"{pick(r['latency'], 0.5)} | {pick(r['latency'], 0.99)} | "
                    f"{r['batches']} ({r['mixed_batches']}) | {' / '.join(f'{m:.0f}' for m in r['rss'])} | {r['mismatches']} | {r['unexpected']} |")
    mixed, single, switching = (results.get(k) for k in list(results)[:3])
    if mixed and single and switching:
        rows.append("")
        rows.append(f"mixed / single adapter: {mixed['texts_s'] / single['texts_s']:.2f}x texts/s; "
                    f"mixed / --no-mix switching: {mixed['texts_s'] / switching['texts_s']:.2f}x texts/s")
    return "\n".join(rows)


def time_forwards(adapters: dict[str, str], repeats: int, device: str = "cpu") -> list[str]:
    """In process, no HTTP: 16 rows spread over the first four adapters answered in one mixed forward
    (`AdapterSet.run_mixed`), in one forward per adapter (`run_inputs`, switching), and all 16 by the
    first adapter in one forward. Interleaved `repeats` times; median and best of each."""
    from peft_ft.serving.predict import AdapterSet

    names = list(adapters)[:4]
    loaded = AdapterSet({n: adapters[n] for n in names}, device=device, batch_size=32)
    texts = TEXTS[:4] * 4
    routes = [names[i % len(names)] for i in range(len(texts))]
    inputs = [loaded.inputs(n, [{"text": t, "text_pair": PAIR_TEXT}] if n in PAIRED else [{"text": t}])[0] for n, t in zip(routes, texts)]

    def switching():
        for n in names:
            loaded.run_inputs(n, [x for x, r in zip(inputs, routes) if r == n])

    ways = {f"mixed: one forward, {len(names)} adapters": lambda: loaded.run_mixed(routes, inputs),
            f"switching: {len(names)} forwards, one per adapter": switching, "single: one forward, one adapter": lambda: loaded.run_inputs(names[0], inputs)}
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    for way in ways.values():
        way()  # warm-up
    for _ in range(repeats):
        for label, way in ways.items():
            start = time.perf_counter()
            way()
            seconds[label].append(time.perf_counter() - start)
    return [f"{label}: median {1000 * sorted(v)[len(v) // 2]:.1f} ms, best {1000 * min(v):.1f} ms for {len(texts)} rows ({repeats} runs)"
            for label, v in seconds.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="train tiny BERT adapters here (pos, flip, ner; with --compare also pos2, flip2) and use them")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR", help="adapters to serve (repeatable; one folder may be given under several names)")
    parser.add_argument("--compare", action="store_true", help="three runs on fresh servers: mixed over the adapters, one adapter, --no-mix; one table")
    parser.add_argument("--repeats", type=positive_int, default=1, help="with --compare: run the three loads this many times, every other time in reverse order")
    parser.add_argument("--forwards", type=non_negative_int, default=0, metavar="N", help="instead of a load: time N mixed vs per-adapter vs single forwards in process")
    parser.add_argument("--pair", action="store_true", help="with --forwards: the adapters are pair classifiers (send text_pair)")
    parser.add_argument("--no-mix", action="store_true", help="start the server with --no-mix (each forward one adapter)")
    parser.add_argument("--clients", type=positive_int, default=8, help="concurrent client threads")
    parser.add_argument("--seconds", type=positive_float, default=20.0, help="upper bound on each load phase")
    parser.add_argument("--max-requests", type=positive_int, default=5000, help="upper bound on requests in each load phase")
    parser.add_argument("--bad", type=non_negative_float, default=0.1, help="share of malformed requests")
    parser.add_argument("--max-batch", type=positive_int, default=32)
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=5.0)
    parser.add_argument("--device", default="cpu", help="the server's --device (cuda: where one forward of many rows costs "
                        "about what one of few rows does, which is what mixing adapters is for)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-every", type=positive_float, default=None, metavar="SECONDS",
                        help="how often the server's RSS is sampled during the load (default: --seconds / 8)")
    args = parser.parse_args(argv)
    if args.bad > 1:
        parser.error(f"argument --bad: a share of the requests, 0 to 1; got {args.bad:g}")
    for spec in args.adapter:  # checked here: a server that fails to start says only "see its log"
        if "=" not in spec:
            parser.error(f"argument --adapter: expected NAME=RUN_DIR, got {spec!r}")
        if not Path(spec.split("=", 1)[1]).is_dir():
            parser.error(f"argument --adapter {spec}: {spec.split('=', 1)[1]} is not a folder; give a run folder")
    if args.smoke:
        args.seconds, args.max_requests = min(args.seconds, 10.0), min(args.max_requests, 1500)
    elif not args.adapter:
        parser.error("give --adapter NAME=RUN_DIR (repeatable) or --smoke")

    workdir = Path(tempfile.mkdtemp(prefix="peft-ft-loadtest-"))
    adapters = train_smoke_adapters(workdir, more=args.compare or bool(args.forwards)) if args.smoke else dict(a.split("=", 1) for a in args.adapter)
    if args.forwards:
        if args.pair:
            PAIRED.update(adapters)
        print("\n".join(time_forwards({n: d for n, d in adapters.items() if n != "ner"}, args.forwards, args.device)))
        return 0
    if not args.compare:
        result = run_phase(adapters, args, workdir)
        print("\n".join(result["lines"]))
        return 0 if result["ok"] else 1
    spread = [n for n in adapters if n != "ner"] if args.smoke else list(adapters)
    phases = [(f"mixed: {len(spread)} adapters, one base", False, spread), (f"single: {spread[0]} only", False, spread[:1]),
              (f"switching (--no-mix): {len(spread)} adapters", True, spread)]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in phases}
    for repeat in range(args.repeats):
        # every other repeat in reverse order: a machine getting busier or quieter does not favour one phase
        for label, no_mix, use in (phases if repeat % 2 == 0 else phases[::-1]):
            args.no_mix = no_mix
            print(f"\n## {label} (run {repeat + 1} of {args.repeats})", flush=True)
            runs[label].append(run_phase({n: adapters[n] for n in spread}, args, workdir, use))
            print("\n".join(runs[label][-1]["lines"]), flush=True)
    results = {label: merge_runs(r) for label, r in runs.items()}
    print("\n" + compare_table(results))
    return 0 if all(r["ok"] for r in results.values()) else 1


def merge_runs(runs: list[dict]) -> dict:
    """Repeats of one phase as one row: rates averaged, latencies pooled, RSS of the first run."""
    n = len(runs)
    return {"requests_s": sum(r["requests_s"] for r in runs) / n, "texts_s": sum(r["texts_s"] for r in runs) / n,
            "per_run": [r["texts_s"] for r in runs], "latency": [x for r in runs for x in r["latency"]], "rss": runs[0]["rss"],
            "ok": all(r["ok"] for r in runs), "mismatches": sum(r["mismatches"] for r in runs), "unexpected": sum(r["unexpected"] for r in runs),
            "batches": sum(r["batches"] or 0 for r in runs), "mixed_batches": sum(r["mixed_batches"] or 0 for r in runs)}


if __name__ == "__main__":
    run_main(main)

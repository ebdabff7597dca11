"""Batches for `peft-ft serve`: one worker thread per loaded base model, batches of bounded tokens.

Requests become jobs (an adapter, its pipeline inputs, each input's cost in tokens, a deadline). The
worker of a base takes rows from every waiting job of that base in turn (round robin: a request of
256 long texts does not hold back a one-text request queued behind it) until the batch reaches
`max_batch_tokens` or `max_batch` rows, so one batch is a bounded amount of work whatever the
requests hold. The rows of a batch are then split by what can share a forward: rows of LoRA
adapters with the same mix key (`AdapterSet.mix_key`) go into one forward, each row with its own
adapter (peft's `adapter_names`); rows of other adapters (prompt/prefix, IA3, DoRA, QA, seq2seq)
run per adapter, switching the active adapter. With `mix=False` every adapter runs apart: the
switching mode that `bench/loadtest.py --no-mix` compares against.

A job past its deadline (or given up by its request) is dropped before its next rows run: the
worker goes on with the others. A failing forward is retried job by job: one bad request does not
fail its neighbours.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from peft_ft.kernels.allocator import freed_memory_releaser


class DeadlineExceeded(Exception):
    """The request's deadline passed before all its rows were answered."""


@dataclass(eq=False)
class Job:
    adapter: str
    inputs: list
    costs: list[int]
    deadline: float  # time.monotonic()
    future: Future = field(default_factory=Future)
    results: list = field(default_factory=list)
    scheduled: int = 0  # rows handed to a batch so far
    answered: int = 0

    def __post_init__(self):
        self.results = [None] * len(self.inputs)

    def give_up(self) -> None:
        """The request stopped waiting (its deadline): no more of its rows are run."""
        self.fail(DeadlineExceeded())

    def fail(self, error: BaseException) -> None:
        try:
            self.future.set_exception(error)
        except InvalidStateError:  # already answered, failed or cancelled by its request
            pass

    def answer(self, i: int, output: dict) -> None:
        self.results[i] = output
        self.answered += 1
        if self.answered == len(self.inputs):
            try:
                self.future.set_result(self.results)
            except InvalidStateError:
                pass


class Base:
    """The queue of one loaded base model and its worker thread."""

    def __init__(self, scheduler: "Scheduler", group):
        self.scheduler, self.group = scheduler, group
        self.cond = threading.Condition()
        self.jobs: list[Job] = []
        self.closed = False  # its model was unloaded: the worker ends once its jobs are done
        self.counter = copy.deepcopy(group.tokenizer)  # token counts in request threads, never racing the worker's tokenizer
        self.counter_lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name=f"base-{id(group):x}", daemon=True)
        self.thread.start()

    def put(self, job: Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def _waiting_tokens(self) -> int:
        return sum(sum(j.costs[j.scheduled:]) for j in self.jobs)

    def _work(self) -> None:
        s = self.scheduler
        while True:
            with self.cond:
                while not self.jobs:
                    if self.closed:
                        self.group = self.counter = None  # the unloaded model can be freed
                        return
                    self.cond.wait()
                until = time.monotonic() + s.max_wait
                while self._waiting_tokens() < s.max_batch_tokens and (left := until - time.monotonic()) > 0:
                    self.cond.wait(left)  # a few ms for more requests to share the batch
                rows = self._take()
            if rows:
                s.run_batch(rows)
                s.release()

    def _take(self) -> list[tuple[Job, int]]:
        """Rows for the next batch, round robin over the waiting jobs; drops jobs that are done or late."""
        s, now = self.scheduler, time.monotonic()
        for job in self.jobs:
            if now > job.deadline:
                job.give_up()
        self.jobs = [j for j in self.jobs if not j.future.done() and j.scheduled < len(j.inputs)]
        rows, tokens, progressed = [], 0, True
        while progressed:
            progressed = False
            for job in self.jobs:
                if job.scheduled >= len(job.inputs):
                    continue
                cost = job.costs[job.scheduled]
                if rows and (tokens + cost > s.max_batch_tokens or len(rows) >= s.max_batch):
                    progressed = False
                    break
                rows.append((job, job.scheduled))
                job.scheduled += 1
                tokens += cost
                progressed = True
        # Jobs served in this batch go to the back of the line: the next batch starts with those that were not.
        served = {id(job) for job, _ in rows}
        self.jobs = [j for j in self.jobs if id(j) not in served] + [j for j in self.jobs if id(j) in served and j.scheduled < len(j.inputs)]
        return rows


class Scheduler:
    """Jobs in, answers out: one `Base` (queue and worker) per loaded base model of an `AdapterSet`."""

    def __init__(self, adapters, metrics, *, max_batch_tokens: int, max_batch: int, max_wait_ms: float, mix: bool = True):
        self.adapters, self.metrics, self.mix = adapters, metrics, mix
        self.max_batch_tokens, self.max_batch = max(1, max_batch_tokens), max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.release = freed_memory_releaser()
        self._bases: dict[int, Base] = {}
        self._lock = threading.Lock()

    def base(self, name: str) -> Base:
        group = self.adapters.get(name).group
        with self._lock:
            base = self._bases.get(id(group))
            if base is None or base.group is not group:
                base = self._bases[id(group)] = Base(self, group)
            return base

    def prune(self) -> None:
        """End the workers of models no longer loaded (after an unload), so their memory can go."""
        loaded = {id(g): g for g in list(self.adapters.groups.values())}
        with self._lock:
            for key, base in list(self._bases.items()):
                if loaded.get(key) is not base.group:
                    del self._bases[key]
                    with base.cond:
                        base.closed = True
                        base.cond.notify()

    def costs(self, name: str, inputs: list) -> list[int]:
        """Tokens the model reads for each input: texts up to the run's max_length (with special
        tokens), all of a NER text (its windows), every window of a QA context, a seq2seq input plus
        the tokens it may generate."""
        adapter = self.adapters.get(name)
        base = self.base(name)
        with base.counter_lock:
            return [adapter.answers.cost(base.counter, adapter.recipe, item) for item in inputs]

    def submit(self, job: Job) -> Future:
        self.base(job.adapter).put(job)
        return job.future

    def run_batch(self, rows: list[tuple[Job, int]]) -> None:
        parts: dict[tuple, list[tuple[Job, int]]] = {}
        for job, i in rows:
            key = self.adapters.mix_key(job.adapter) if self.mix and job.adapter in self.adapters.adapters else None
            parts.setdefault(("mix", key) if key else ("alone", job.adapter), []).append((job, i))
        for part in parts.values():
            self._run_part(part)

    def _run_part(self, part: list[tuple[Job, int]]) -> None:
        names = [job.adapter for job, _ in part]
        inputs = [job.inputs[i] for job, i in part]
        try:
            if len(set(names)) == 1:
                outputs = self.adapters.run_inputs(names[0], inputs)
            else:
                outputs = self.adapters.run_mixed(names, inputs)
        except Exception as e:
            jobs = list(dict.fromkeys(job for job, _ in part))
            if len(jobs) == 1 and len(set(names)) == 1:
                jobs[0].fail(e)
                return
            for job in jobs:  # one request at a time, on its own adapter: a bad one fails alone
                self._run_alone(job, part)
            return
        self._deliver(part, outputs, names)

    def _deliver(self, part: list[tuple[Job, int]], outputs: list[dict], names: list[str]) -> None:
        self.metrics.batch(names)
        for (job, i), output in zip(part, outputs):
            job.answer(i, output)

    def _run_alone(self, job: Job, part: list[tuple[Job, int]]) -> None:
        own = [(j, i) for j, i in part if j is job]
        try:
            outputs = self.adapters.run_inputs(job.adapter, [job.inputs[i] for _, i in own])
        except Exception as e:
            job.fail(e)
            return
        self._deliver(own, outputs, [job.adapter] * len(own))

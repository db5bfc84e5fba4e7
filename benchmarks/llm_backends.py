"""Particle-filtering throughput on the toy task: HF vs vLLM in-process vs vLLM server
(vs its_hub driving the same server, where installed).

    .venv-vllm/bin/python benchmarks/llm_backends.py --problems 20 --particles 8
    .venv-vllm/bin/python benchmarks/llm_backends.py --backends server,its_hub --concurrency 8   # each at its best

Every backend runs the same particle filter (``tests/vllm_server.run_toy``: StepModel
tilted by the soft step checker, step delimiter "\\n", weighted-majority answer)
on the same held-out toy problems with the same seeds. Reported: sampled tokens per
second (the run's ledger) and problems per minute (wall clock, after the backend is ready and has run one
warm-up problem: start-up is reported separately), and accuracy. its_hub's ``ParticleFiltering`` gets the same model
(the same vLLM server), the same number of particles, the same step
delimiter and the same checker, read as a PRM probability (1 for a correct prefix, 0.1
otherwise: its weights are logit(probability)); its answer is its own argmax selection.
A markdown table goes to stdout. With ``--concurrency K`` both sides run K problems at once,
each at its best: ours through ``ppl_scaling.models.lockstep.run_many`` (the runs' step requests
merged into one batch per round; the same filter through ``run_method``), its_hub through
``ParticleFiltering.ainfer`` gathered with asyncio (K problems in flight).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_scaling.ledger import recording  # noqa: E402
from ppl_scaling.models.vllm_backend import CPU_ENGINE_KWARGS, cpu_environment  # noqa: E402

if not torch.cuda.is_available():
    cpu_environment()

from tests.vllm_server import (TOY, VLLMServer, WRONG_STEP_LOG_PENALTY, run_toy,  # noqa: E402
                               toy_problems)

# its_hub sends chat requests (user = prompt, assistant = steps so far, continued): this
# template makes them the same raw text our completions requests carry.
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def server_generated_tokens(url: str) -> float:
    """The server's own count of generated tokens (Prometheus /metrics)."""
    import urllib.request

    root = url[:-3] if url.endswith("/v1") else url
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


def _measure(name: str, lm, problems, args, setup_s: float) -> dict:
    run_toy(lm, problems[:1], num_particles=args.particles, seed=10**6)  # warm-up, not timed
    with recording() as spent:
        rows = run_toy(lm, problems, num_particles=args.particles, seed=args.seed, temperature=args.temperature)
    return {"backend": name, "setup_s": setup_s, "wall_s": spent.wall_s, "tokens": spent.tokens,
            "accuracy": float(np.mean([r["correct"] for r in rows]))}


def bench_hf(problems, args) -> dict:
    from ppl_scaling.models.hf import HFLanguageModel

    t0 = time.perf_counter()
    lm = HFLanguageModel.from_pretrained(TOY, dtype="float32")
    return _measure("HF (transformers, KV cache)", lm, problems, args, time.perf_counter() - t0)


def bench_vllm(problems, args) -> dict:
    from ppl_scaling.models.vllm_backend import VLLMLanguageModel

    t0 = time.perf_counter()
    lm = VLLMLanguageModel(TOY, seed=0, max_num_seqs=128, block_size=32, logprobs=args.logprobs,
                           **(CPU_ENGINE_KWARGS if not torch.cuda.is_available() else {}))
    return _measure("vLLM in-process", lm, problems, args, time.perf_counter() - t0)


def bench_server(problems, args, server: VLLMServer) -> dict:
    from ppl_scaling.models.openai_backend import OpenAICompatibleLanguageModel

    t0 = time.perf_counter()
    lm = OpenAICompatibleLanguageModel(server.url, "toy", tokenizer=TOY, max_concurrency=64, logprobs=args.logprobs)
    out = _measure("vLLM server (OpenAI API)", lm, problems, args, time.perf_counter() - t0 + server.ready_s)
    lm.close()
    return out


def bench_server_lockstep(problems, args, server: VLLMServer) -> dict:
    """The same filter (``particle_filtering_adaptive``: SMC on StepModel tilted by the soft
    checker, weighted majority) on ``args.concurrency`` problems at once in lockstep."""
    from ppl_scaling.models.harness import MethodConfig
    from ppl_scaling.models.lockstep import Job, run_many
    from ppl_scaling.models.openai_backend import OpenAICompatibleLanguageModel
    from ppl_scaling.models.toy import STEP_DELIMITER, extract_answer

    from tests.vllm_server import soft_checker

    config = MethodConfig(step_delimiter=STEP_DELIMITER, max_steps=8, max_step_tokens=16, temperature=args.temperature,
                          stop=r"A:-?\d+\n", extract=extract_answer, key=int)
    lm = OpenAICompatibleLanguageModel(server.url, "toy", tokenizer=TOY, max_concurrency=256, logprobs=args.logprobs)

    def jobs(ps, seed):
        return [Job("particle_filtering_adaptive", p.prompt, args.particles, np.random.default_rng(seed + i))
                for i, p in enumerate(ps)]

    run_many(jobs(problems[:1], 10**6), lm, prm=soft_checker, concurrency=1, config=config)   # warm-up
    with recording() as spent:
        runs = run_many(jobs(problems, args.seed), lm, prm=soft_checker, concurrency=args.concurrency, config=config)
    lm.close()
    return {"backend": f"vLLM server (ours, lockstep K={args.concurrency})", "setup_s": server.ready_s,
            "wall_s": spent.wall_s, "tokens": sum(r.ledger.tokens for r in runs),
            "accuracy": float(np.mean([r.answer == p.answer for r, p in zip(runs, problems)]))}


def bench_its_hub(problems, args, server: VLLMServer) -> dict | None:
    try:
        import its_hub  # noqa: F401
    except ImportError:
        print("its_hub is not installed here (pip install its-hub); skipped", file=sys.stderr)
        return None
    import asyncio

    from its_hub import OpenAICompatibleLanguageModel as ItsHubLM
    from its_hub import StepGeneration
    from its_hub.api import AbstractProcessRewardModel
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering

    from ppl_scaling.models.toy import STEP_DELIMITER, check_steps, extract_answer

    class Checker(AbstractProcessRewardModel):
        """The same soft step checker, as a PRM probability."""

        def score(self, prompt, responses):
            return [1.0 if check_steps(prompt, r) else float(np.exp(WRONG_STEP_LOG_PENALTY)) for r in responses]

        async def ascore(self, prompt, responses):
            return self.score(prompt, responses)

    lm = ItsHubLM(endpoint=server.url, api_key="none", model_name="toy", max_concurrency=64)
    sg = StepGeneration(max_steps=8, step_token=STEP_DELIMITER, stop_token="A:", temperature=args.temperature,
                        include_stop_str_in_output=True)
    pf = ParticleFiltering(sg, Checker())
    pf.infer(lm, problems[0].prompt, budget=args.particles)  # warm-up, not timed
    before = server_generated_tokens(server.url)

    async def gather(k: int) -> list:
        limit = asyncio.Semaphore(k)

        async def one(p):
            async with limit:
                return await pf.ainfer(lm, p.prompt, budget=args.particles, return_response_only=True)

        return await asyncio.gather(*(one(p) for p in problems))

    t0 = time.perf_counter()
    if args.concurrency > 1:
        outs = asyncio.run(gather(args.concurrency))
    else:
        outs = [pf.infer(lm, p.prompt, budget=args.particles, return_response_only=True) for p in problems]
    wall = time.perf_counter() - t0
    correct = []
    for p, out in zip(problems, outs):
        text = out.get("content", "") if isinstance(out, dict) else str(out)
        correct.append(extract_answer(text) == p.answer)
    if hasattr(lm, "close"):
        asyncio.run(lm.close())
    name = "its_hub ParticleFiltering -> vLLM server" + (f" (asyncio, K={args.concurrency})"
                                                           if args.concurrency > 1 else "")
    return {"backend": name, "setup_s": server.ready_s, "wall_s": wall,
            "tokens": server_generated_tokens(server.url) - before, "accuracy": float(np.mean(correct))}


def table(rows: list[dict], n_problems: int) -> str:
    base = next((r for r in rows if r["backend"].startswith("HF")), rows[0])
    lines = ["| backend | start-up s | wall s | tokens/s | problems/min | speed-up vs HF | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['setup_s']:.1f} | {r['wall_s']:.1f} | {r['tokens'] / r['wall_s']:.0f} | "
                     f"{60 * n_problems / r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.2f}x | "
                     f"{r['accuracy']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="hf,vllm,server,its_hub")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="problems at once for the server backends (ours in lockstep, its_hub with asyncio)")
    ap.add_argument("--logprobs", action="store_true",
                    help="ask vLLM for the sampled tokens' log-probabilities (the filter here does not need them; "
                         "on a CPU server they double the cost of a request)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    problems = toy_problems(args.problems)
    wanted = args.backends.split(",")
    rows = []
    if "hf" in wanted:
        rows.append(bench_hf(problems, args))
    if "vllm" in wanted:
        rows.append(bench_vllm(problems, args))
    if "server" in wanted or "its_hub" in wanted:
        t0 = time.perf_counter()
        with VLLMServer(TOY, name="toy", extra_args=["--chat-template", CHAT_TEMPLATE]) as server:
            server.ready_s = time.perf_counter() - t0
            if "server" in wanted:
                rows.append(bench_server(problems, args, server))
                if args.concurrency > 1:
                    rows.append(bench_server_lockstep(problems, args, server))
            if "its_hub" in wanted:
                r = bench_its_hub(problems, args, server)
                if r is not None:
                    rows.append(r)
    print(f"\n{args.problems} toy problems, {args.particles} particles, temperature {args.temperature}, "
          f"vLLM log-probabilities {'on' if args.logprobs else 'off'}, torch threads {torch.get_num_threads()}\n")
    print(table(rows, args.problems))


if __name__ == "__main__":
    main()

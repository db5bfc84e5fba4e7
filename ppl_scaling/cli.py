"""Command line: ``ppl-scaling demo | eval | report | run``.

    ppl-scaling eval --task arithmetic --methods particle_filtering,best_of_n,self_consistency \\
        --budgets 1,4,16,64 --problems 200 --seed 0 --out results.jsonl
    ppl-scaling report results.jsonl --plot scaling.png
    ppl-scaling run --prompt $'Q:24+5-4\\n' --method particle_filtering --budget 16

``eval`` appends one JSON line per (problem, method, budget) and resumes when rerun;
Ctrl-C stops it with nothing lost. ``--model`` / ``--prm`` take a local directory or
a Hugging Face hub id (default for ``--task arithmetic``: the bundled toy LM and PRM);
``--dataset`` a JSONL file with ``problem`` and ``answer`` per line (``--task math``
for a real model's math problems).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["arithmetic", "math"], default="arithmetic",
                   help="arithmetic: the bundled toy task; math: a JSONL dataset for a real model")
    p.add_argument("--model", help="language model: local directory or hub id (default for arithmetic: bundled toy LM)")
    p.add_argument("--prm", help="process reward model: local directory or hub id (default for arithmetic: bundled toy PRM)")
    p.add_argument("--backend", choices=["hf", "vllm", "openai"], default="hf",
                   help="hf: transformers; vllm: vLLM engine in this process; openai: OpenAI-compatible servers")
    p.add_argument("--base-url", action="append", default=[], dest="base_urls",
                   help="with --backend openai: a server URL such as http://host:8000/v1 (repeat for replicas)")
    p.add_argument("--tokenizer", help="with --backend openai: a local tokenizer (default: the server's /tokenize)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=None, help="LLM sampling temperature (default: the task's)")
    p.add_argument("--prm-aggregation", choices=["last", "min", "prod", "model"], default="last",
                   help="how the PRM's step scores make a prefix score (default: last)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the PRM's own code (needed by Qwen2.5-Math-PRM)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-scaling", description="Inference-time scaling as posterior sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run SMC on the bundled models; print summaries, save plots")
    demo.add_argument("--out", default="demo_output", help="folder for plots and tables (default: demo_output)")

    ev = sub.add_parser("eval", help="methods x budgets on a dataset, to a resumable JSONL file")
    _add_model_args(ev)
    ev.add_argument("--methods", type=_csv(str), default=["particle_filtering", "best_of_n", "self_consistency"],
                    help="comma-separated methods, each optionally name:rule (see ppl_scaling.samplers.METHODS)")
    ev.add_argument("--budgets", type=_csv(int), default=[1, 4, 16], help="comma-separated budgets N")
    ev.add_argument("--problems", type=int, default=None, help="use the first N problems (default: all)")
    ev.add_argument("--dataset", help="JSONL file with 'problem' and 'answer' per line")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", required=True, help="results JSONL (appended; rerun to resume)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", help="accuracy table and scaling plots from results JSONL")
    rp.add_argument("results", help="results JSONL written by `ppl-scaling eval`")
    rp.add_argument("--plot", help="write accuracy-vs-budget and accuracy-vs-tokens plots here (PNG)")

    run = sub.add_parser("run", help="one prompt: run a method and print the weighted answers")
    _add_model_args(run)
    run.add_argument("--prompt", required=True, help="the prompt (arithmetic: 'Q:24+5-4' or '24+5-4')")
    run.add_argument("--method", default="particle_filtering")
    run.add_argument("--budget", type=int, default=16)
    run.add_argument("--seed", type=int, default=0)
    return parser


def _models(args) -> tuple[object, object, str, str]:
    from .models import evaluate as ev
    from .models import toy

    model = args.model or (str(toy.TOY_LM_PATH) if args.task == "arithmetic" else None)
    prm_path = args.prm or (str(toy.TOY_PRM_PATH) if args.task == "arithmetic" else None)
    if model is None:
        raise ValueError("--task math needs --model (a local directory or a hub id)")
    lm = ev.load_lm(model, device=args.device, dtype=args.dtype, backend=args.backend, base_urls=args.base_urls,
                    tokenizer=args.tokenizer)
    prm = ev.load_prm(prm_path, device=args.device, dtype=args.dtype, aggregation=args.prm_aggregation,
                      trust_remote_code=args.trust_remote_code) if prm_path else None
    return lm, prm, model, prm_path or ""


def _task(args, lm, num_problems=None, dataset=None):
    from .models import evaluate as ev

    if args.task == "arithmetic":
        task = ev.arithmetic_task(num_problems, dataset)
    else:
        if dataset is None:
            raise ValueError("--task math needs --dataset FILE.jsonl")
        task = ev.math_task(dataset, lm, num_problems)
    return ev.with_config(task, temperature=args.temperature) if args.temperature is not None else task


def _eval(args) -> int:
    from .models import evaluate as ev
    from .models.report import accuracy_table, format_table

    lm, prm, model, prm_path = _models(args)
    task = _task(args, lm, args.problems, args.dataset)
    try:
        rows = ev.evaluate(task, lm, prm, args.methods, args.budgets, args.out, seed=args.seed,
                           model_name=model, prm_name=prm_path, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are saved in {args.out}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(format_table(accuracy_table(rows)))
    return 0


def _run(args) -> int:
    import numpy as np

    from .models.harness import MethodConfig, run_method

    lm, prm, _, _ = _models(args)
    if args.task == "arithmetic":
        from .models import toy
        from .models.evaluate import ARITHMETIC_CONFIG

        start, ops = toy.parse_question(args.prompt)
        prompt = toy.Problem("prompt", str(start) + "".join(f"{o}{b}" for o, b in ops), 0).prompt
        config = ARITHMETIC_CONFIG
    else:
        from .models.evaluate import chat_prompt

        prompt, config = chat_prompt(lm, args.prompt), MethodConfig()
    if args.temperature is not None:
        config = dataclasses.replace(config, temperature=args.temperature)
    run = run_method(args.method, lm, prompt, prm=prm, budget=args.budget,
                     rng=np.random.default_rng(args.seed), config=config)
    print(f"{args.method}, budget {args.budget}: answer {run.answer}")
    for answer, w in run.result.weighted_answers(run.answers):
        print(f"  {w:6.3f}  {answer}")
    spent = run.ledger
    print(f"tokens {spent.tokens}, forward passes {spent.forward_passes}, reward calls {spent.reward_calls}, "
          f"{spent.wall_s:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out)
        return 0
    try:
        if args.command == "report":
            from .models.report import report

            print(report(args.results, args.plot))
            return 0
        return _eval(args) if args.command == "eval" else _run(args)
    except (ValueError, OSError) as e:  # bad input: say what and stop, no traceback
        print(f"ppl-scaling {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

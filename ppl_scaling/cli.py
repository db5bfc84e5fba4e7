"""Command line: ``ppl-scaling demo | eval | report | regrade | allocate | run``.

    ppl-scaling eval --task arithmetic --methods particle_filtering,best_of_n,self_consistency \\
        --budgets 1,4,16,64 --problems 200 --seed 0 --out results.jsonl
    ppl-scaling report results.jsonl --plot scaling.png
    ppl-scaling eval ... --save-completions --out results.jsonl   # + results.completions.jsonl
    ppl-scaling regrade results.jsonl --out regraded.jsonl       # no models needed
    ppl-scaling eval --split validation ... --out val.jsonl        # then a compute-optimal policy:
    ppl-scaling allocate val.jsonl --token-budget 400 --out policy.json
    ppl-scaling eval --methods compute_optimal --policy policy.json --budgets 1 --out test.jsonl
    ppl-scaling run --prompt $'Q:24+5-4\\n' --method particle_filtering --budget 16

``eval`` appends one JSON line per (problem, method, budget) and resumes when rerun
with the same settings (other settings are refused, naming what differs; so is an
``--out`` file that is not a results file, and a second eval writing the same file);
Ctrl-C stops it with nothing lost. A run that fails is written as an error row and
the eval goes on; ``--retry-errors`` reruns those. ``--model`` / ``--prm`` take a local
directory or a Hugging Face hub id (default for ``--task arithmetic``: the bundled toy
LM and PRM); ``--dataset`` a JSONL file with ``problem`` and ``answer`` per line
(``--task math`` for a real model's math problems). ``--save-completions`` keeps every
run's candidates so that ``regrade`` can re-extract, re-select and re-grade the answers
without the models. ``--verbose`` also logs runs skipped on resume, retries and replica
health; warnings (a failed run, a repaired file) always show.

Exit codes: 0 done; 1 ``eval`` finished but some runs failed (error rows); 2 an error
(one line on stderr, ``ppl-scaling: error: ...``; ``--debug`` adds the traceback);
130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback

MESSAGE_CHARS = 2000   # an error message is cut to this length (--debug shows all)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"ppl-scaling: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite temperature >= 0, got {text!r}")
    return value


def _csv(kind, what: str = "values"):
    def parse(text: str):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return list(dict.fromkeys(values))   # duplicates count once
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["arithmetic", "math"], default="arithmetic",
                   help="arithmetic: the bundled toy task; math: a MATH / GSM8K / AIME dataset for a real model")
    p.add_argument("--model", help="language model: local directory or hub id (default for arithmetic: bundled toy LM)")
    p.add_argument("--prm", help="process reward model: local directory or hub id (default for arithmetic: bundled toy PRM)")
    p.add_argument("--backend", choices=["hf", "vllm", "openai"], default="hf",
                   help="hf: transformers; vllm: vLLM engine in this process; openai: OpenAI-compatible servers")
    p.add_argument("--base-url", action="append", default=[], dest="base_urls",
                   help="with --backend openai: a server URL such as http://host:8000/v1 (repeat for replicas)")
    p.add_argument("--tokenizer", help="with --backend openai: a local tokenizer (default: the server's /tokenize)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu or cuda (default: auto; recorded in the results)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--temperature", type=_temperature, default=None, help="LLM sampling temperature (default: the task's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top tokens of mass top_p (default: off)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most probable tokens (default: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min_p times the most probable one's probability (default: off)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="most steps per generation (default: the task's)")
    p.add_argument("--max-step-tokens", type=_positive_int, default=None,
                   help="most tokens per step (default: the task's; keep it below the model's context length)")
    p.add_argument("--prm-aggregation", choices=["last", "min", "prod", "model"], default="last",
                   help="how the PRM's step scores make a prefix score (default: last)")
    p.add_argument("--early-stop", default=None, metavar="RULE",
                   help="stop generating once the answer is decided: 'settled' (the vote can no longer change), "
                        "'settled:0.95' (Adaptive-Consistency's Beta rule), 'finished:K' (K samples finished)")
    p.add_argument("--token-budget", type=_positive_int, default=None,
                   help="stop each run once it spent this many generated + reward tokens (compute-matched runs)")
    p.add_argument("--system-prompt", default=None,
                   help="--task math: the system prompt the policy is asked with (default: a step-by-step, "
                        "\\boxed{} instruction; '' for none); reward models use their own")
    p.add_argument("--chat-template", default=None,
                   help="how the policy reads a question: a Jinja file or template text, or 'none' for plain "
                        "text (default: the tokenizer's chat template); reward models use their own")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the PRM's own code (needed by Qwen2.5-Math-PRM)")


def _build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback")
    debug.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                       help="also log what goes on: runs skipped on resume, retries, replica health")
    parser = _Parser(prog="ppl-scaling", description="Inference-time scaling as posterior sampling.",
                     parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[debug], help="run SMC on the bundled models; print summaries, save plots")
    demo.add_argument("--out", default="demo_output", help="folder for plots and tables (default: demo_output)")

    ev = sub.add_parser("eval", parents=[debug], help="methods x budgets on a dataset, to a resumable JSONL file")
    _add_model_args(ev)
    ev.add_argument("--methods", type=_csv(str, "method names"),
                    default=["particle_filtering", "best_of_n", "self_consistency"],
                    help="comma-separated methods, each optionally name:rule (see ppl_scaling.samplers.METHODS)")
    ev.add_argument("--budgets", type=_csv(_positive_int, "positive integers"), default=[1, 4, 16],
                    help="comma-separated budgets N (duplicates count once)")
    ev.add_argument("--problems", type=_positive_int, default=None, help="use the first N problems (default: all)")
    ev.add_argument("--dataset", help="JSONL or JSON file (MATH / MATH-500, GSM8K or AIME style records), a folder "
                    "saved by `datasets`, or a hub id (--task math); arithmetic: toy questions as JSONL")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", required=True, help="results JSONL (appended; rerun with the same settings to resume)")
    ev.add_argument("--retry-errors", action="store_true",
                    help="rerun the runs that failed (the error rows of --out), replacing their rows")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--save-completions", action="store_true",
                    help="also keep every candidate (text, answer, weight, reward) and each run's log Z and ESS "
                         "in OUT's .completions.jsonl, to re-grade (`ppl-scaling regrade`) and inspect offline")

    ev.add_argument("--concurrency", type=_positive_int, default=None,
                    help="runs advanced in lockstep with their model calls merged into shared batches (same rows "
                         "as one at a time; default: 8 on vLLM, servers and GPUs, 1 for transformers on a CPU)")
    ev.add_argument("--expensive-prm", help="verify_cascade's expensive verifier: a PRM (local directory or hub id); "
                    "default for arithmetic: the exact step checker")
    ev.add_argument("--policy", help="the compute-optimal policy (JSON from `ppl-scaling allocate`) that method "
                    "compute_optimal follows")
    ev.add_argument("--split", choices=["test", "validation"], default="test",
                    help="arithmetic: the held-out split (default: test; allocate policies on validation)")

    al = sub.add_parser("allocate", parents=[debug],
                        help="a compute-optimal policy (method and budget per difficulty bin) from a validation eval")
    al.add_argument("results", help="results JSONL of an eval on validation problems, including the pilot's rows")
    al.add_argument("--token-budget", type=float, required=True,
                    help="mean tokens (generated + reward) per problem, the pilot's included")
    al.add_argument("--pilot", default="self_consistency:4", metavar="METHOD:N",
                    help="the pilot whose answer agreement bins the problems (default: self_consistency:4)")
    al.add_argument("--bins", type=_positive_int, default=3, help="difficulty bins (default: 3)")
    al.add_argument("--out", required=True, help="the policy JSON to write")

    rg = sub.add_parser("regrade", parents=[debug],
                        help="re-grade an eval's runs from their saved completions, without the models")
    rg.add_argument("results", help="results JSONL of `ppl-scaling eval --save-completions`")
    rg.add_argument("--out", required=True, help="the re-graded results JSONL (resumable; never the input)")
    rg.add_argument("--no-progress", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", parents=[debug], help="accuracy table and scaling plots from results JSONL")
    rp.add_argument("results", help="results JSONL written by `ppl-scaling eval`")
    rp.add_argument("--plot", help="write accuracy-vs-budget and accuracy-vs-compute (tokens) plots here (PNG)")
    rp.add_argument("--compare", action="append", default=[], metavar="A,B",
                    help="paired comparison of methods A and B (names as in the rows) at each budget: mean "
                         "difference, paired bootstrap 95%% CI, exact McNemar p (repeatable)")
    rp.add_argument("--resamples", type=_positive_int, default=2000, help="bootstrap resamples (default: 2000)")
    rp.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap (default: 0)")

    run = sub.add_parser("run", parents=[debug], help="one prompt: run a method and print the weighted answers")
    _add_model_args(run)
    run.add_argument("--prompt", required=True, help="the prompt (arithmetic: 'Q:24+5-4' or '24+5-4')")
    run.add_argument("--method", default="particle_filtering")
    run.add_argument("--budget", type=_positive_int, default=16)
    run.add_argument("--seed", type=int, default=0)
    return parser


def _models(args) -> tuple[object, object, str, str]:
    from .models import evaluate as ev
    from .models import toy

    model = args.model or (str(toy.TOY_LM_PATH) if args.task == "arithmetic" else None)
    prm_path = args.prm or (str(toy.TOY_PRM_PATH) if args.task == "arithmetic" else None)
    if model is None:
        raise ValueError("--task math needs --model (a local directory or a hub id)")
    args.device = ev.resolve_device(args.device)   # resolved once: the models load there, the results record it
    lm = ev.load_lm(model, device=args.device, dtype=args.dtype, backend=args.backend, base_urls=args.base_urls,
                    tokenizer=args.tokenizer)
    prm = ev.load_prm(prm_path, device=args.device, dtype=args.dtype, aggregation=args.prm_aggregation,
                      trust_remote_code=args.trust_remote_code) if prm_path else None
    return lm, prm, model, prm_path or ""


def _task(args, num_problems=None, dataset=None):
    from .models import evaluate as ev

    if args.task == "arithmetic":
        task = ev.arithmetic_task(num_problems, dataset, split=getattr(args, "split", "test"))
    else:
        if dataset is None:
            raise ValueError("--task math needs --dataset (a JSONL / JSON file, a saved dataset folder or a hub id)")
        system = ev.MATH_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt
        task = ev.math_task(dataset, num_problems, system_prompt=system)
    return ev.with_config(task, **_config_changes(args))


def _policy(args):
    if getattr(args, "policy", None) is None:
        return None
    from .allocation import Policy

    return Policy.read(args.policy)


def _config_changes(args) -> dict:
    """The generation settings given on the command line (the others stay the task's)."""
    from .models.chat import read_chat_template

    given = {"temperature": args.temperature, "max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens,
             "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
             "chat_template": read_chat_template(args.chat_template), "early_stop": args.early_stop,
             "token_budget": args.token_budget, "policy": _policy(args)}
    changes = {k: v for k, v in given.items() if v is not None}
    if args.early_stop is not None:    # refuse a bad rule before any model loads
        from .models.harness import MethodConfig

        MethodConfig(early_stop=args.early_stop).stop_rule()
    if {"top_p", "top_k", "min_p"} & set(changes):   # refuse bad values before any model loads
        from .models.lm import check_sampling

        check_sampling(1.0, changes.get("top_p", 1.0), changes.get("top_k"), changes.get("min_p", 0.0))
    return changes


def _eval(args) -> int:
    from .jsonl import ResultsFile
    from .models import evaluate as ev
    from .models.report import accuracy_table, format_table

    if args.task == "math" and args.dataset is None:
        raise ValueError("--task math needs --dataset FILE.jsonl")
    from .models.harness import parse_method

    for m in args.methods:
        parse_method(m)                 # unknown methods, ...
    if args.dataset is not None and args.task == "math":
        from .models.datasets import load_problems

        args.dataset = load_problems(args.dataset)   # ... a bad dataset (loaded once) ...
    elif args.dataset is not None:
        ev.read_dataset(args.dataset)   # ... a bad dataset ...
    _config_changes(args)               # ... bad sampling controls or chat template ...
    ResultsFile.peek(args.out, ev.KEY)  # ... and an --out that is not a results file, or busy: before the models load
    lm, prm, model, prm_path = _models(args)
    task = _task(args, args.problems, args.dataset)
    if args.expensive_prm:
        task = ev.with_config(task, expensive_verifier=ev.load_prm(args.expensive_prm, device=args.device,
                                                                  dtype=args.dtype,
                                                                  trust_remote_code=args.trust_remote_code))
    try:
        rows = ev.evaluate(task, lm, prm, args.methods, args.budgets, args.out, seed=args.seed,
                           model_name=model, prm_name=prm_path, progress=not args.no_progress,
                           retry_errors=args.retry_errors, backend=args.backend, device=args.device,
                           save_completions=args.save_completions, concurrency=args.concurrency)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are saved in {args.out}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(format_table(accuracy_table(rows)))
    errors = sum(1 for r in rows if ev.is_error_row(r))
    if errors:
        print(f"ppl-scaling: {errors} of {len(rows)} runs in {args.out} failed (error rows: see their 'error' "
              "field); rerun with --retry-errors to retry them", file=sys.stderr)
        return 1
    return 0


def _allocate(args) -> int:
    import json
    from pathlib import Path

    from .allocation import allocate
    from .models.report import load_rows

    method, _, n = args.pilot.rpartition(":")
    if not method or not n.isdigit() or int(n) < 1:
        raise ValueError(f"--pilot {args.pilot!r}: expected METHOD:N, e.g. self_consistency:4")
    rows = load_rows(args.results)
    groups = {r.get("settings_id") for r in rows}
    if len(groups) > 1:
        raise ValueError(f"{args.results} holds rows of {len(groups)} different settings; allocate from one evaluation")
    policy = allocate(rows, args.token_budget, pilot=(method, int(n)), num_bins=args.bins)
    Path(args.out).write_text(json.dumps(policy.to_json(), indent=1) + "\n")
    print(f"pilot {method} N={n}; agreement bin edges {list(policy.edges)}")
    for b, (m, size) in enumerate(policy.choices):
        share = policy.bin_shares[b] if b < len(policy.bin_shares) else float("nan")
        print(f"  bin {b} ({share:.0%} of problems): {m} N={size}")
    print(f"expected accuracy {policy.expected_accuracy:.3f} at {policy.expected_tokens:.0f} tokens per problem "
          f"(budget {args.token_budget:g}); written to {args.out}")
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
        from .models.evaluate import MATH_SYSTEM_PROMPT
        from .models.types import Question

        system = MATH_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt or None
        prompt, config = Question(args.prompt, system), MethodConfig()
    config = dataclasses.replace(config, **_config_changes(args))
    run = run_method(args.method, lm, prompt, prm=prm, budget=args.budget,
                     rng=np.random.default_rng(args.seed), config=config)
    print(f"{args.method}, budget {args.budget}: answer {run.answer}")
    for answer, w in run.result.weighted_answers(run.answers):
        print(f"  {w:6.3f}  {answer}")
    spent = run.ledger
    print(f"tokens {spent.tokens}, forward passes {spent.forward_passes}, reward calls {spent.reward_calls}, "
          f"{spent.wall_s:.2f} s")
    return 0


class _StderrHandler(logging.Handler):
    """Warnings of the library (a failed run, a repaired file) as lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"ppl-scaling: {record.getMessage()}", file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError, LookupError)):
        message = f"{type(error).__name__}: {message}"
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + " ... (cut; --debug shows all)"
    return message


def main(argv: list[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as e:   # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = getattr(args, "debug", False)
    log = logging.getLogger("ppl_scaling")
    handler = _StderrHandler(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    log.addHandler(handler)
    level = log.level
    log.setLevel(min(level or logging.WARNING, handler.level))
    propagate, log.propagate = log.propagate, False
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out)
            return 0
        if args.command == "report":
            from .models.report import report

            print(report(args.results, args.plot, compare=args.compare, resamples=args.resamples,
                         seed=args.bootstrap_seed))
            return 0
        if args.command == "allocate":
            return _allocate(args)
        if args.command == "regrade":
            from .models.evaluate import regrade
            from .models.report import accuracy_table, format_table

            print(format_table(accuracy_table(regrade(args.results, args.out, progress=not args.no_progress))))
            return 0
        return _eval(args) if args.command == "eval" else _run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("ppl-scaling: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # the reader went away (`ppl-scaling report r.jsonl | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except Exception as e:  # noqa: BLE001 -- every error: one line, no traceback (unless --debug)
        if debug:
            traceback.print_exc()
        print(f"ppl-scaling: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``ppl-scaling demo``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppl-scaling", description="Inference-time scaling as posterior sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run SMC on the bundled models; print summaries, save plots")
    demo.add_argument("--out", default="demo_output", help="folder for plots and tables (default: demo_output)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

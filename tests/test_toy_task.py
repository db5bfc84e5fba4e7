"""The bundled toy arithmetic task: generator, splits, JSONL, exact checker,
tokenizer, and the committed tiny LM and learned PRM."""
import json
import re

import numpy as np
import pytest

from ppl_scaling.models import toy
from ppl_scaling.models.tokenizer import VOCAB, build_tokenizer

STEP_RE = re.compile(r"^\d+[+-]\d=\d+$")


# ----------------------------------------------------------------------------- generator and splits


def test_generator_is_deterministic_and_respects_ranges():
    a = toy.generate_problems(np.random.default_rng(3), 300)
    b = toy.generate_problems(np.random.default_rng(3), 300)
    assert a == b
    assert {p.difficulty for p in a} == set(toy.DIFFICULTIES)
    for p in a:
        start, ops = toy.parse_question(p.question)
        assert 1 <= start <= 30 and all(1 <= b <= 9 for _, b in ops)
        totals = [int(line.split("=")[1]) for line in toy.solution_steps(p.question)[:-1]]
        assert all(0 <= t <= 99 for t in totals)
        assert totals[-1] == p.answer == toy.solve(p.question)


@pytest.mark.parametrize("difficulty", toy.DIFFICULTIES)
def test_difficulty_is_number_of_operations(difficulty):
    p = toy.generate_problem(np.random.default_rng(difficulty), difficulty)
    assert p.difficulty == difficulty
    assert len(toy.solution_steps(p.question)) == difficulty + 1


def test_bad_difficulty_and_question_are_refused():
    with pytest.raises(ValueError, match="difficulty"):
        toy.generate_problem(np.random.default_rng(0), 6)
    with pytest.raises(ValueError, match="not a toy arithmetic question"):
        toy.parse_question("Q: what is 2+2?")


def test_held_out_splits_are_fixed_balanced_and_disjoint():
    test, validation = toy.load_split("test"), toy.load_split("validation")
    assert len(test) == len(validation) == 200
    # Pinned, so that a change of generator (or numpy stream) cannot silently move the split.
    assert (test[0].id, test[0].question, test[0].answer) == ("test-0000", "18+2-7-6+3", 10)
    for split in (test, validation):
        assert len({p.question for p in split}) == 200
        assert [sum(p.difficulty == d for p in split) for d in toy.DIFFICULTIES] == [40] * 5
    assert not {p.question for p in test} & {p.question for p in validation}
    assert toy.load_split("test") == test
    with pytest.raises(ValueError, match="unknown split"):
        toy.load_split("train")


def test_training_problems_avoid_held_out_questions():
    # ~600 one-operation problems among ~540 possible: without exclusion many would be held out.
    train = toy.training_problems(np.random.default_rng(0), 3000)
    assert not {p.question for p in train} & toy.held_out_questions()


def test_jsonl_round_trip_and_bad_lines(tmp_path):
    problems = toy.load_split("test")[:5]
    path = toy.write_jsonl(problems, tmp_path / "toy.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"id": "test-0000", "problem": "Q:18+2-7-6+3\n", "answer": "10"}
    assert toy.read_jsonl(path) == problems

    (tmp_path / "bare.jsonl").write_text('{"problem": "24+5", "answer": 29}\n\n')
    assert toy.read_jsonl(tmp_path / "bare.jsonl") == [toy.Problem("line-1", "24+5", 29)]
    (tmp_path / "no_answer.jsonl").write_text('{"problem": "24+5"}\n')
    with pytest.raises(ValueError, match="missing field 'answer'"):
        toy.read_jsonl(tmp_path / "no_answer.jsonl")
    (tmp_path / "wrong.jsonl").write_text('{"problem": "24+5", "answer": "30"}\n')
    with pytest.raises(ValueError, match="wrong"):
        toy.read_jsonl(tmp_path / "wrong.jsonl")


# ----------------------------------------------------------------------------- exact checker

Q = "Q:24+5-4-7+6\n"
GOOD = ["24+5=29\n", "29-4=25\n", "25-7=18\n", "18+6=24\n", "A:24\n"]


def test_checker_accepts_the_solution_and_its_prefixes():
    assert toy.solution_steps(Q) == GOOD
    for k in range(len(GOOD) + 1):
        assert toy.check_steps(Q, GOOD[:k])
    assert toy.check_steps("24+5-4-7+6", "".join(GOOD))  # bare question, steps as one string
    assert toy.check_steps(Q, GOOD[:-1] + ["A:24"])  # final line ended by EOS, no newline
    assert toy.is_complete(Q, GOOD) and not toy.is_complete(Q, GOOD[:-1])


@pytest.mark.parametrize("steps, first_wrong", [
    (["24+5=28\n"], 0),                                   # wrong arithmetic
    (["24+5=29\n", "29-7=22\n"], 1),                      # skipped operation (-4)
    (["24+5=29\n", "29+4=33\n"], 1),                      # wrong sign
    (["24+5=29\n", "28-4=24\n"], 1),                      # not the running total
    (GOOD[:4] + ["A:25\n"], 4),                           # wrong final answer
    (GOOD[:3] + ["A:18\n"], 3),                           # answer before the last operation
    (GOOD + ["A:24\n"], 5),                               # anything after the answer
    (["24+5=29\n", "\n"], 1),                             # an empty line
    (["24 + 5 = 29\n"], 0),                               # not the format
])
def test_checker_rejects_wrong_steps(steps, first_wrong):
    flags = toy.step_correctness(Q, steps)
    assert flags == [i < first_wrong for i in range(len(flags))]
    assert not toy.check_steps(Q, steps)
    assert toy.check_steps(Q, steps[:first_wrong])


def test_answer_extraction():
    assert toy.extract_answer("24+5=29\nA:29\n") == 29
    assert toy.extract_answer("24+5=29\nA:29") == 29
    assert toy.extract_answer("24+5=29\n") is None
    assert toy.extract_answer("A:1\nA:2\n") == 1
    assert toy.is_correct("A:29\n", "29") and toy.is_correct("A:29\n", 29)
    assert not toy.is_correct("A:28\n", 29) and not toy.is_correct("", 29)


@pytest.mark.parametrize("text", ["\n" * 1_000_000, "A:" * 500_000, "A:\n" * 300_000, "A:-" * 300_000,
                                  " " * 1_000_000, "A:" + "1" * 4000 + "x\n"])
def test_answer_extraction_is_fast_on_adversarial_completions(text):
    import time

    from ppl_scaling.models.answers import extract_answer

    t0 = time.perf_counter()
    assert toy.extract_answer(text) is None
    extract_answer(text)
    assert time.perf_counter() - t0 < 1.0


def test_answer_extraction_of_a_huge_number_gives_none():
    assert toy.extract_answer("A:" + "1" * 5000 + "\n") is None


def test_toy_answers_grade_through_the_math_grader():
    from ppl_scaling.models.answers import extract_answer, grade

    for p in toy.load_split("test")[:20]:
        completion = p.solution
        assert grade(extract_answer(completion), str(p.answer)) == (True, False)
        assert extract_answer(completion) == str(toy.extract_answer(completion))
        assert not grade(extract_answer(completion), str(p.answer + 1)).correct


# ----------------------------------------------------------------------------- tokenizer and assets


@pytest.mark.parametrize("text", ["Q:24+5-4-7+6\n24+5=29\n", "\n\n", "A:7", ""])
def test_tokenizer_round_trip(text):
    tok = build_tokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("path", [toy.TOY_LM_PATH, toy.TOY_PRM_PATH])
def test_assets_tokenizer_loads_with_auto_tokenizer(path):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.encode(GOOD[0]) == build_tokenizer().encode(GOOD[0])
    assert len(tok) == len(VOCAB) == AutoConfig.from_pretrained(path).vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(toy.TOY_LM_PATH), AutoTokenizer.from_pretrained(toy.TOY_LM_PATH)


def test_bundled_lm_writes_well_formed_solutions(lm):
    model, tok = lm
    assert model.config.head_dim >= 32 and model.config.model_type == "llama"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    problems = toy.load_split("test")[:16]
    tok.padding_side = "left"
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=64)
    new = out[:, enc["input_ids"].shape[1]:]
    correct = 0
    for p, ids in zip(problems, new.tolist()):
        assert tok.eos_token_id in ids, "greedy decoding should end with EOS"
        text = tok.decode(ids, skip_special_tokens=True)
        lines = toy.split_lines(text)
        assert all(STEP_RE.match(line) for line in lines[:-1]) and lines[-1].startswith("A:"), text
        assert len(lines) == p.difficulty + 1, text
        correct += toy.is_correct(text, p.answer)
    assert correct >= 4  # greedy is better than the ~1/3 of a temperature-1 sample


def test_bundled_prm_ranks_correct_prefixes_above_wrong_ones():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import torch

    prm = AutoModelForSequenceClassification.from_pretrained(toy.TOY_PRM_PATH)
    tok = AutoTokenizer.from_pretrained(toy.TOY_PRM_PATH)
    assert prm.config.num_labels == 2 and prm.config.pad_token_id == tok.pad_token_id
    good, bad = [], []
    for p in toy.load_split("test")[:40]:
        steps = toy.solution_steps(p.question)
        k = p.difficulty  # all operation lines, before the answer
        a, result = steps[k - 1].rstrip("\n").split("=")
        wrong = steps[: k - 1] + [f"{a}={(int(result) + 37) % 100}\n"]
        good.append(p.prompt + "".join(steps[:k]))
        bad.append(p.prompt + "".join(wrong))
    tok.padding_side = "left"
    with torch.no_grad():
        scores = torch.softmax(prm(**tok(good + bad, return_tensors="pt", padding=True)).logits, -1)[:, 1]
    good_s, bad_s = scores[:40], scores[40:]
    # The committed PRM is deliberately imperfect (measured: 36/40 pairs, means 0.54 vs 0.19).
    assert (good_s > bad_s).float().mean() >= 0.8
    assert good_s.mean() > bad_s.mean() + 0.2

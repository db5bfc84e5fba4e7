"""`models.datasets.load_problems`: MATH / MATH-500, GSM8K and AIME-style records from JSONL,
JSON, a saved `datasets` folder and the hub; levels and subjects; clear errors; `--device auto`."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from ppl_scaling.models import datasets as dsm
from ppl_scaling.models import evaluate as ev
from ppl_scaling.models.datasets import Problem, load_problems, normalize_level

FIXTURES = Path(__file__).parent / "fixtures"


def triples(ds):
    return [(r.problem, r.answer, r.level) for r in ds.records]


def test_math500_jsonl():
    ds = load_problems(FIXTURES / "math500.jsonl")
    assert ds.name == "math500.jsonl" and len(ds.records) == 4
    assert triples(ds) == [("What is $3+4$?", "7", 1), ("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}", 2),
                           ("Solve $2x=10$ for $x$.", "5", 3), ("How many sides has a hexagon?", "6", 5)]
    assert [r.id for r in ds.records][:2] == ["test/prealgebra/1.json", "test/algebra/7.json"]
    assert [r.subject for r in ds.records] == ["Prealgebra", "Algebra", "Algebra", "Geometry"]


def test_original_math_json_answers_come_from_the_last_boxed_of_the_solution():
    ds = load_problems(FIXTURES / "math_original.json")
    assert triples(ds) == [("What is $2^3$?", "8", 3), ("Find $\\sqrt{49}$.", "7", 1),
                           ("Write $0.5$ as a fraction.", "\\frac{1}{2}", None)]   # "Level ?": unknown
    assert [r.subject for r in ds.records] == ["Algebra", "Prealgebra", "Number Theory"]
    assert [r.id for r in ds.records] == ["record-1", "record-2", "record-3"]


def test_gsm8k_answers_are_the_number_after_hashes():
    ds = load_problems(FIXTURES / "gsm8k.jsonl")
    assert triples(ds) == [("Q:3+4", "7", None), ("Q:9-2", "7", None),
                           ("Ann has 1,200 beads and buys 34 more. How many beads?", "1234", None)]
    assert [r.id for r in ds.records] == ["line-1", "line-2", "line-3"]


def test_aime_style_capitalised_fields():
    ds = load_problems(FIXTURES / "aime.jsonl")
    assert [(r.id, r.answer) for r in ds.records] == [("2024-I-1", "24"), ("2024-I-2", "9"), ("2024-II-3", "051")]
    assert ds.records[1].problem == "How many positive divisors does $36$ have?"
    assert all(r.level is None and r.subject is None for r in ds.records)


def test_json_wrapped_in_an_object_and_level_normalisation(tmp_path):
    f = tmp_path / "wrapped.json"
    f.write_text(json.dumps({"data": [{"id": 1, "problem": "1+1", "answer": 2, "difficulty": "3"}]}))
    (r,) = load_problems(f).records
    assert r == Problem("1", "1+1", "2", 3, None)
    assert [normalize_level(v) for v in ("Level 4", "level 2", 5, 2.0, "Level ?", None, "hard", True)] == \
        [4, 2, 5, 2, None, None, None, None]


@pytest.mark.parametrize("name, text, message", [
    ("no_answer.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": "b", "solution": "no box"}\n',
     "no_answer.jsonl:2: no 'answer' field and the 'solution' has no \\boxed{} answer"),
    ("no_field.jsonl", '{"problem": "a", "answer": "1"}\n\n{"problem": "b"}\n', "no_field.jsonl:3: missing field 'answer'"),
    ("no_problem.json", '[{"problem": "a", "answer": "1"}, {"text": "b", "answer": "2"}]',
     "no_problem.json: record 2: missing field 'problem' (or 'question' / 'Problem'); found fields 'text', 'answer'"),
    ("dup.json", '[{"id": "x", "problem": "a", "answer": "1"}, {"id": "x", "problem": "b", "answer": "2"}]',
     "dup.json: duplicate problem ids: 'x' on records 1 and 2"),
    ("bad.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": \n', "bad.jsonl:2: not valid JSON"),
    ("bad.json", '[{"problem": "a",]', "bad.json: not valid JSON"),
    ("scalar.json", '"hello"', "scalar.json: expected a JSON list of problem objects"),
    ("notobj.jsonl", '[1, 2]\n', "notobj.jsonl:1: expected an object"),
    ("empty.jsonl", '\n\n', "empty.jsonl: the dataset has no problems"),
])
def test_errors_name_the_file_the_record_and_the_field(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_problems(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_a_missing_file_and_an_unreachable_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)        # not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        load_problems("someone/some-math")
    folder = tmp_path / "saved"
    folder.mkdir()
    with pytest.raises(ValueError, match="pip install datasets"):
        load_problems(folder)

    def offline(name, split=None):
        raise ConnectionError("Couldn't reach the hub (offline mode is enabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(dsm.DatasetUnavailable) as e:
        load_problems("someone/some-math")
    assert "'someone/some-math' could not be loaded" in str(e.value) and "pass a local" in str(e.value)


def test_a_saved_datasets_folder_and_a_hub_id(tmp_path, monkeypatch):
    """Through a stand-in for `datasets` (a DatasetDict is a dict of splits; a Dataset iterates over dicts)."""
    rows = [{"problem": "What is $1+2$?", "answer": "3", "level": 2, "subject": "Algebra", "unique_id": "u1"},
            {"problem": "What is $2+2$?", "answer": "4", "level": 4, "subject": "Algebra", "unique_id": "u2"}]
    calls = []
    fake = types.SimpleNamespace(
        load_from_disk=lambda p: calls.append(("disk", p)) or {"train": [rows[0]], "test": rows},
        load_dataset=lambda name, split=None: calls.append(("hub", name, split)) or rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = tmp_path / "MATH-500"
    folder.mkdir()
    ds = load_problems(folder)
    assert ds.name == "MATH-500" and [(r.id, r.answer, r.level) for r in ds.records] == [("u1", "3", 2), ("u2", "4", 4)]
    assert [(r.id,) for r in load_problems(folder, split="train").records] == [("u1",)]
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_problems(folder, split="dev")
    hub = load_problems("HuggingFaceH4/MATH-500", split="test")
    assert hub.records == ds.records and calls[-1] == ("hub", "HuggingFaceH4/MATH-500", "test")
    fake.load_from_disk = lambda p: [{"question": "x"}]
    with pytest.raises(ValueError, match=r"MATH-500: record 1: missing field 'answer'"):
        load_problems(folder)


def test_math_task_items_keep_level_and_subject_and_the_hash_covers_the_content(tmp_path):
    task = ev.math_task(FIXTURES / "math500.jsonl")
    assert [(it.id, it.answer, it.difficulty, it.subject) for it in task.items][:2] == [
        ("test/prealgebra/1.json", "7", 1, "Prealgebra"), ("test/algebra/7.json", "\\frac{1}{2}", 2, "Algebra")]
    assert task.dataset_name == "math500.jsonl" and task.dataset_hash.startswith("sha256:")
    assert ev.math_task(FIXTURES / "math500.jsonl", num_problems=2).dataset_hash == task.dataset_hash
    copy = tmp_path / "copy.jsonl"
    text = (FIXTURES / "math500.jsonl").read_text()
    copy.write_text(text)
    assert ev.math_task(copy).dataset_hash == task.dataset_hash          # content, not the name
    copy.write_text(text.replace('"answer": "5"', '"answer": "6"'))
    assert ev.math_task(copy).dataset_hash != task.dataset_hash
    copy.write_text(text.replace('"level": 3', '"level": 4'))
    assert ev.math_task(copy).dataset_hash != task.dataset_hash
    plain = tmp_path / "plain.jsonl"       # a plain {problem, answer} file keeps its pre-loader hash
    plain.write_text('{"id": "a", "problem": "Q:3+4", "answer": "7"}\n')
    assert ev.math_task(plain).dataset_hash == ev.content_hash([("a", "Q:3+4", "7")])


# --- devices -------------------------------------------------------------------------------

def test_device_auto_resolves_to_cuda_when_available(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.resolve_device("auto") == "cuda" and ev.resolve_device(None) == "cuda"
    assert ev.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.resolve_device("auto") == "cpu" and ev.resolve_device("cuda:1") == "cuda:1"
    assert ev.device_type("cuda:1") == "cuda" and ev.device_type(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("cuda, cpu_settings", [(True, False), (False, True)])
def test_vllm_gets_gpu_engine_settings_on_cuda_and_cpu_settings_on_cpu(monkeypatch, cuda, cpu_settings):
    import torch

    from ppl_scaling.models import vllm_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = {}
    monkeypatch.setattr(vllm_backend, "cpu_environment", lambda: seen.setdefault("cpu_environment", True))
    monkeypatch.setattr(vllm_backend, "VLLMLanguageModel", lambda name, **kw: seen.setdefault("kwargs", kw))
    ev.load_lm("some/model", backend="vllm", dtype="bfloat16")        # --device auto, the default
    assert seen.get("cpu_environment", False) == cpu_settings
    cpu_keys = set(vllm_backend.CPU_ENGINE_KWARGS) - {"dtype"}
    assert (cpu_keys <= set(seen["kwargs"])) == cpu_settings and seen["kwargs"]["dtype"] == "bfloat16"


def test_the_cli_resolves_the_device_once_and_records_it(tmp_path, monkeypatch):
    import torch

    from ppl_scaling.cli import main
    from llm_fixtures import TOY_LM_PATH

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    devices = []
    real = ev.load_lm

    def on_cpu(path, device="auto", **kw):   # no GPU here: check what it was asked for, load on the CPU
        devices.append(device)
        return real(path, device="cpu", **kw)

    real_prm = ev.load_prm
    monkeypatch.setattr(ev, "load_lm", on_cpu)
    monkeypatch.setattr(ev, "load_prm", lambda path, device="auto", **kw: devices.append(device) or
                        real_prm(path, device="cpu", **kw))
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--problems", "1", "--methods", "self_consistency", "--budgets", "1", "--out", str(out),
                 "--no-progress", "--model", str(TOY_LM_PATH)]) == 0
    assert devices == ["cuda", "cuda"]      # the LM and the PRM
    assert json.loads(out.read_text().splitlines()[0])["settings"]["device"] == "cuda"

"""Shared LLM fixtures: the bundled toy LM (loaded once per session), a small random
classifier PRM saved in Hugging Face format (loaded by path like any real PRM), and
the toy task's exact step checker as a process reward model."""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ppl_scaling.models import toy
from ppl_scaling.models.rewards import ProcessRewardModel

TOY_LM_PATH = toy.TOY_LM_PATH


@lru_cache(maxsize=None)
def toy_lm():
    from ppl_scaling.models.hf import HFLanguageModel

    return HFLanguageModel.from_pretrained(TOY_LM_PATH)


@lru_cache(maxsize=None)
def prm_path() -> Path:
    """A randomly initialised LlamaForSequenceClassification with the toy LM's
    architecture and tokenizer (untrained: its scores are arbitrary but deterministic)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = Path(tempfile.mkdtemp(prefix="random_prm_"))
    config = LlamaConfig.from_pretrained(TOY_LM_PATH, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOY_LM_PATH).save_pretrained(path)
    return path


@lru_cache(maxsize=None)
def random_prm() -> ProcessRewardModel:
    return ProcessRewardModel.from_pretrained(prm_path())


class ExactStepScorer:
    """Step probabilities from the exact checker: ``good`` if every line so far is right, else ``bad``."""

    name = "exact"

    def __init__(self, good: float = 0.95, bad: float = 0.05) -> None:
        self.good, self.bad = good, bad

    def __call__(self, requests):
        return [np.array([self.good if toy.check_steps(prompt, steps[:j + 1]) else self.bad
                          for j in range(first, len(steps))]) for prompt, steps, first in requests]


def exact_prm(**kwargs) -> ProcessRewardModel:
    return ProcessRewardModel(ExactStepScorer(), **kwargs)

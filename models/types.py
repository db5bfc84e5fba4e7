"""What is asked and the value an LLM particle holds, as potentials and reward models see it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """A question as asked: its raw text and, optionally, the system message to ask it with.

    Each model formats it its own way: the policy with its chat template
    (``ppl_scaling.models.chat.format_question``), a process reward model with its own
    template, system prompt and step separator (``scorers.HFStepScorer``), a judge with its
    own (``rewards.LLMJudge``). So no model reads another model's template.
    """

    text: str
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"a question needs non-empty text, got {self.text!r}")


@dataclass(frozen=True)
class Partial:
    """A (possibly unfinished) generation: the prompt and the steps generated so far.

    ``prompt`` is the text the policy conditioned on (its chat template applied);
    ``question`` the raw question reward models read (default: the prompt itself, for
    prompts that are not templated questions). Each step is the generated text of one
    SMC step, including its trailing delimiter (e.g. "24+5=29\\n"); ``finished`` is True
    once the generation ended (EOS, final answer, or a length limit).
    """

    prompt: str
    steps: tuple[str, ...] = ()
    finished: bool = False
    question: str = None  # type: ignore[assignment]  # None: the prompt

    def __post_init__(self) -> None:
        if self.question is None:
            object.__setattr__(self, "question", self.prompt)

    @property
    def completion(self) -> str:
        return "".join(self.steps)

    @property
    def text(self) -> str:
        return self.prompt + self.completion

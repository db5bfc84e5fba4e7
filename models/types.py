"""The value an LLM particle holds, as potentials and reward models see it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Partial:
    """A (possibly unfinished) generation: the prompt and the steps generated so far.

    Each step is the generated text of one SMC step, including its trailing
    delimiter (e.g. "24+5=29\\n"); ``finished`` is True once the generation ended
    (EOS, final answer, or a length limit).
    """

    prompt: str
    steps: tuple[str, ...] = ()
    finished: bool = False

    @property
    def completion(self) -> str:
        return "".join(self.steps)

    @property
    def text(self) -> str:
        return self.prompt + self.completion

"""How the policy reads a question: its chat template, another template, or plain text.

    q = Question("What is 2 + 3?", system_prompt="Think step by step.")
    format_question(lm.tokenizer, q)                     # the tokenizer's own chat template
    format_question(lm.tokenizer, q, chat_template=jinja)   # another Jinja template
    format_question(None, q, chat_template=RAW)          # "Think step by step.\\n\\nWhat is 2 + 3?\\n\\n"

The rule: ``chat_template=None`` uses the tokenizer's chat template when it has one, else
plain text; a Jinja string is rendered by the tokenizer's ``apply_chat_template`` (system
and user turns, then the generation prompt); ``RAW`` ("none") is plain text: the system
prompt and the question, each followed by a blank line. Reward models never read this
text: they get the raw question (``Partial.question``) and format it their own way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .types import Question

__all__ = ["RAW", "format_question", "read_chat_template", "messages"]

RAW = "none"


def messages(question: Question) -> list[dict[str, str]]:
    """The chat turns of a question: the system prompt (if any) and the user's question."""
    turns = [{"role": "system", "content": question.system_prompt}] if question.system_prompt else []
    return turns + [{"role": "user", "content": question.text}]


def format_question(tokenizer: Any, question: Question | str, *, chat_template: str | None = None) -> str:
    """The prompt text the policy conditions on (module docstring). A plain string is a
    question without a system prompt."""
    if isinstance(question, str):
        question = Question(question)
    if chat_template == RAW or (chat_template is None and not getattr(tokenizer, "chat_template", None)):
        system = question.system_prompt.rstrip() + "\n\n" if question.system_prompt else ""
        return system + question.text.rstrip() + "\n\n"
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("a chat template needs the model's tokenizer to render it, and this model has none; "
                         f"pass chat_template={RAW!r} (plain text) or a model with a Hugging Face tokenizer")
    return tokenizer.apply_chat_template(messages(question), chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True)


def read_chat_template(value: str | None) -> str | None:
    """A ``--chat-template`` value: None (the model's own), ``RAW``, a path to a Jinja file
    (``.jinja``, ``.j2`` or ``.txt``), or the template itself (text containing ``{{`` or ``{%``)."""
    if value is None or value == RAW:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"chat template {value!r} is neither a file nor a Jinja template; pass a .jinja file, "
                         f"the template text, or {RAW!r} for plain text")
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"chat template {value!r} has no Jinja expression ({{{{ ... }}}} or {{% ... %}})")
    return text

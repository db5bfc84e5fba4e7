"""LLM token streams as Feynman-Kac models.

- ``LanguageModel`` (the small interface a custom LM implements), ``HFLanguageModel``
  (transformers, KV-cached batched steps); vLLM and OpenAI-compatible servers in
  ``vllm_backend`` / ``openai_backend`` (imported lazily).
- ``StepModel``: stepwise generation as dynamics; a reward steers it through
  ``ppl_scaling.Tilted`` (every sampler of ``ppl_scaling.samplers`` takes it with a potential).
- ``harness``: a method by name on one prompt (``run_method``, ``MethodConfig``);
  ``evaluate`` / ``report``: datasets x methods x budgets, tables and plots.
- ``rewards``: process / outcome reward models, verifiers, LLM judges as potentials.
- ``answers``: answer extraction and math equivalence.
- ``toy``: the bundled arithmetic task, tiny LM and PRM.
"""
from .hf import HFLanguageModel, KVContexts
from .lm import Contexts, LanguageModel, StepSample
from .step import StepModel, StepState
from .types import Partial

__all__ = ["LanguageModel", "Contexts", "StepSample", "HFLanguageModel", "KVContexts", "StepModel", "StepState",
           "Partial"]

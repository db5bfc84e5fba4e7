"""Tiny random models of the README's GPU recipe, built offline: a Qwen2.5-Math-Instruct-style
policy (``Qwen2ForCausalLM``) and a Qwen2.5-Math-PRM-style reward model
(``Qwen2ForTokenClassification``, two labels read at ``<extra_0>`` separators), with a
byte-level BPE tokenizer (no merges: every byte is a token) carrying Qwen's special tokens
and Qwen2.5's chat template (its default system turn included). Same architectures,
prompt formats and loading code as the real checkpoints; random weights."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
import tempfile

import torch

# Qwen2.5-Math-Instruct's chat template without the tool-calling branches.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]


def qwen_tokenizer():
    """Byte-level BPE (256 byte tokens, no merges) + Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<extra_0>"],
                                  clean_up_tokenization_spaces=False, model_max_length=4096)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _config(tok, **extra):
    from transformers import Qwen2Config

    # head_dim 32: vLLM's CPU attention supports it (16 is refused)
    return Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), **extra)


@lru_cache(maxsize=None)
def qwen_models() -> tuple[Path, Path]:
    """(policy folder, PRM folder), saved with ``save_pretrained`` in a temporary directory."""
    from transformers import Qwen2ForCausalLM, Qwen2ForTokenClassification

    root = Path(tempfile.mkdtemp(prefix="tiny_qwen_"))
    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(_config(tok, tie_word_embeddings=True))
        prm = Qwen2ForTokenClassification(_config(tok, num_labels=2))
    for model, name in ((policy, "Qwen2.5-Math-1.5B-Instruct-tiny"), (prm, "Qwen2.5-Math-PRM-7B-tiny")):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "Qwen2.5-Math-1.5B-Instruct-tiny", root / "Qwen2.5-Math-PRM-7B-tiny"

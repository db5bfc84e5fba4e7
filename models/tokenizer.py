"""Character-level tokenizer of the bundled toy arithmetic task, in Hugging Face format.

One token per character of ``0-9 + - = : Q A \\n``, plus ``<pad>``, ``<bos>``,
``<eos>`` and ``<unk>``. Encoding prepends ``<bos>``; decoding concatenates the
characters with no added spaces, so ``decode(encode(s), skip_special_tokens=True) == s``
for every string over the alphabet (newlines included).

    tok = build_tokenizer()
    tok.save_pretrained(path)          # AutoTokenizer.from_pretrained(path) loads it (vLLM too)

Underneath: a ``tokenizers`` WordLevel model over single characters, a
pre-tokenizer that isolates every character, a ``<bos> $A`` template and a
``Fuse`` decoder, wrapped in ``PreTrainedTokenizerFast``.
"""
from __future__ import annotations

ALPHABET = "0123456789+-=:QA\n"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}


def build_tokenizer():
    """The toy task's tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    # "[\\s\\S]" matches any single character, newline included.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, padding_side="left",
        model_max_length=128)

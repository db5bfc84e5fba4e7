"""A tiny randomly initialised Llama with a character tokenizer, for tests (no downloads)."""
from __future__ import annotations

import torch

CHARS = "abc\n"


def sharpen(model, factor: float):
    """Scale every weight matrix of a random model by ``factor`` (sharper, more context-dependent
    predictions than the default init); returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model


def build_tiny_llama(path):
    """A random 2-layer Llama (head_dim 32, grouped-query attention) and a character tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", clean_up_tokenization_spaces=False)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = sharpen(LlamaForCausalLM(cfg), 4.0)   # sharper next-token distributions than the default init
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

"""Offline diffusion fixtures for the tests: tiny, randomly initialised diffusers pipelines of each
family (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux), built from configs with character-level tokenizers.
Their images are noise; they exercise the plumbing, not the quality."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def clip_tokenizer(max_length: int = 16) -> Any:
    """A character-level ``CLIPTokenizer`` (vocab and an empty merges file written to a temporary folder)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=max_length)


def t5_tokenizer(max_length: int = 16) -> Any:
    """A character-level T5-style fast tokenizer: a ``tokenizers`` BPE without merges, ``</s>`` appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def clip_text_encoder(hidden_size: int = 16, projection_dim: int = 16, with_projection: bool = False) -> Any:
    """A 2-layer CLIP text encoder (``CLIPTextModelWithProjection`` with ``with_projection``); vocab 100."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size,
                            intermediate_size=2 * hidden_size, num_attention_heads=2, num_hidden_layers=2,
                            vocab_size=100, max_position_embeddings=16, projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_encoder(d_model: int = 16) -> Any:
    """A 1-layer ``T5EncoderModel``; vocab 64."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=2,
                                   num_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def vae(latent_channels: int = 4, sample_size: int = 16, **config: Any) -> Any:
    """A 2-block ``AutoencoderKL`` (vae_scale_factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
                         sample_size=sample_size, **config).eval()


def tiny_random_pipeline(seed: int = 0, sample_size: int = 8) -> Any:
    """A tiny ``StableDiffusionPipeline`` (UNet, VAE, CLIP text encoder); images 2 * sample_size."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size,
                                    in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                    norm_num_groups=4, attention_head_dim=4)
        autoencoder = vae(sample_size=sample_size * 2)
        text = clip_text_encoder()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=autoencoder, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8) -> Any:
    """A tiny ``StableDiffusionXLPipeline``: two CLIP encoders (hidden 16 + 16 = cross-attention 32; the
    second with a 16-d projection: the pooled ``text_embeds``), a "text_time" UNet (6 time ids x 8 + 16)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size,
                                    in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                                    transformer_layers_per_block=1, use_linear_projection=True)
        autoencoder = vae(sample_size=sample_size * 2, scaling_factor=0.13025)
        text, text_2 = clip_text_encoder(), clip_text_encoder(with_projection=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=autoencoder, text_encoder=text, text_encoder_2=text_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet.eval(),
                                     scheduler=scheduler, add_watermarker=False)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 16) -> Any:
    """A tiny ``StableDiffusion3Pipeline``: two projected CLIP encoders (pooled 16 + 16 = 32), a T5
    encoder (d_model 32 = joint attention dim), a 1-layer ``SD3Transformer2DModel`` (patch 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4,
                                            num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                            joint_attention_dim=32, caption_projection_dim=16,
                                            pooled_projection_dim=32, pos_embed_max_size=sample_size)
        autoencoder = vae(sample_size=sample_size * 2, scaling_factor=1.5305, shift_factor=0.0609,
                          use_quant_conv=False, use_post_quant_conv=False)
        text, text_2 = clip_text_encoder(with_projection=True), clip_text_encoder(with_projection=True)
        text_3 = t5_encoder(32)
    return StableDiffusion3Pipeline(transformer=transformer.eval(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=autoencoder,
                                    text_encoder=text, tokenizer=clip_tokenizer(), text_encoder_2=text_2,
                                    tokenizer_2=clip_tokenizer(), text_encoder_3=text_3, tokenizer_3=t5_tokenizer())


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> Any:
    """A tiny ``FluxPipeline`` (Flux-dev style with ``guidance_embeds``): a CLIP encoder (pooled 16),
    a T5 encoder (d_model 32), a 1+1-layer ``FluxTransformer2DModel`` on 2x2 patches of 4 latent channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                             axes_dims_rope=(4, 4, 8))
        autoencoder = vae(sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                          use_quant_conv=False, use_post_quant_conv=False)
        text, text_2 = clip_text_encoder(), t5_encoder(32)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FluxPipeline(transformer=transformer.eval(), scheduler=scheduler, vae=autoencoder, text_encoder=text,
                        tokenizer=clip_tokenizer(), text_encoder_2=text_2, tokenizer_2=t5_tokenizer())

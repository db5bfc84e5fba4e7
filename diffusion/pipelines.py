"""FK steering of a diffusers ``StableDiffusionPipeline``, through its components.

No pipeline code is copied: the pipeline's own ``encode_prompt``, ``unet``, ``vae`` and
scheduler config are wrapped into the three things a ``DiffusionModel`` needs::

    denoiser(latents, t, cond)  UNet with classifier-free guidance,
                                eps = eps_u + g (eps_c - eps_u); cond = per-particle prompt embeddings
    decode(latents)             VAE decode of x0 predictions to images in [0, 1] (for the reward)
    scheduler                   the pipeline's, if DDPM/DDIM; otherwise DDIM built from its config
                                (stochastic, eta = 1 by default)

and the FK model runs on latents. The per-particle prompt embeddings ride in the particle
state, so resampling moves each latent together with its own conditioning (one prompt per
particle is allowed; particles then compete across prompts, which targets the tilted
mixture over prompts; run one call per prompt to steer each prompt separately).

    out = steer_stable_diffusion(pipe, "a photo of a cat", reward, num_particles=4, lam=10.0,
                                 num_inference_steps=50, resample_every=5, t_start=5, t_end=30, seed=0)
    out.samples  # (N, 3, H, W) images in [0, 1];  out.info["latents"], out.smc
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import torch

from .model import Reward
from .steering import SamplingResult, fk_steering

_STOCHASTIC_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


class StableDiffusionDenoiser:
    """``denoiser(latents, t, cond)`` of a Stable Diffusion UNet with classifier-free guidance.

    ``cond`` is a dict with ``prompt_embeds`` (N, seq, dim); ``negative_embeds`` (1, seq, dim)
    is shared by all particles. ``guidance_scale <= 1`` runs the conditional UNet only.
    """

    def __init__(self, unet: Any, negative_embeds: torch.Tensor | None, guidance_scale: float) -> None:
        self.unet = unet
        self.negative_embeds = negative_embeds
        self.guidance_scale = float(guidance_scale)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0 and self.negative_embeds is not None

    def __call__(self, latents: torch.Tensor, t: Any, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        emb = cond["prompt_embeds"]
        if emb.shape[0] != latents.shape[0]:
            raise ValueError(f"{emb.shape[0]} prompt embeddings for {latents.shape[0]} latents; "
                             "conditioning must have one row per particle")
        if not self.guided:
            return self.unet(latents, t, encoder_hidden_states=emb).sample
        neg = self.negative_embeds.expand(latents.shape[0], *self.negative_embeds.shape[1:])
        out = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([neg, emb])).sample
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


class VAEDecoder:
    """Latents -> images in [0, 1]: ``vae.decode(latents / scaling_factor)``, rescaled from [-1, 1]."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def stochastic_scheduler(pipe_scheduler: Any) -> Any:
    """The pipeline's scheduler if DDPM/DDIM, else a DDIMScheduler from its config (use eta > 0)."""
    if type(pipe_scheduler).__name__ in _STOCHASTIC_SCHEDULERS:
        return pipe_scheduler
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe_scheduler.config)


def stable_diffusion_parts(pipe: Any, prompt: str | list[str], num_particles: int, *,
                           negative_prompt: str | None = None, guidance_scale: float = 7.5,
                           height: int | None = None, width: int | None = None
                           ) -> tuple[StableDiffusionDenoiser, VAEDecoder, dict[str, torch.Tensor], tuple[int, ...]]:
    """(denoiser, decode, cond, latent sample_shape) for ``DiffusionModel`` / ``fk_steering``."""
    prompts = [prompt] * num_particles if isinstance(prompt, str) else list(prompt)
    if len(prompts) != num_particles:
        raise ValueError(f"got {len(prompts)} prompts for {num_particles} particles; give one prompt or one per particle")
    device = pipe._execution_device
    guided = guidance_scale > 1.0
    with torch.no_grad():
        emb, neg = pipe.encode_prompt(prompts, device, 1, guided,
                                      negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts))
    neg = neg[:1] if guided else None
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {pipe.vae_scale_factor}, got {height}x{width}")
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return StableDiffusionDenoiser(pipe.unet, neg, guidance_scale), VAEDecoder(pipe.vae), {"prompt_embeds": emb}, shape


def steer_stable_diffusion(pipe: Any, prompt: str | list[str], reward: Reward, *, num_particles: int = 4,
                           lam: float = 1.0, potential: str = "difference", num_inference_steps: int = 50,
                           guidance_scale: float = 7.5, negative_prompt: str | None = None,
                           height: int | None = None, width: int | None = None, eta: float = 1.0,
                           scheduler: Any = None, resample_every: int | None = None, t_start: int = 0,
                           t_end: int | None = None, ess_threshold: float = 0.5, reward_every_step: bool = False,
                           seed: int | None = None, rng: np.random.Generator | None = None,
                           store_history: bool = False, progress: bool = False) -> SamplingResult:
    """Prompt -> FK-steered images. ``reward`` maps images (N, 3, H, W) in [0, 1] to (N,);
    the other options are ``fk_steering``'s. ``samples`` are the decoded final images."""
    denoiser, decode, cond, shape = stable_diffusion_parts(pipe, prompt, num_particles, negative_prompt=negative_prompt,
                                                           guidance_scale=guidance_scale, height=height, width=width)
    out = fk_steering(denoiser, scheduler or stochastic_scheduler(pipe.scheduler), shape, reward,
                      num_particles=num_particles, lam=lam, potential=potential,
                      num_inference_steps=num_inference_steps, eta=eta, decode=decode,
                      resample_every=resample_every, t_start=t_start, t_end=t_end, ess_threshold=ess_threshold,
                      reward_every_step=reward_every_step, cond=cond, seed=seed, rng=rng,
                      device=pipe._execution_device, dtype=pipe.unet.dtype, store_history=store_history,
                      progress=progress)
    latents = out.samples
    out.samples = decode(latents)
    out.info.update(latents=latents, prompt=prompt, guidance_scale=guidance_scale)
    return out


def tiny_random_pipeline(seed: int = 0, sample_size: int = 8) -> Any:
    """A tiny, randomly initialised ``StableDiffusionPipeline`` built offline from configs
    (UNet, VAE, CLIP text encoder, a character-level CLIP tokenizer), for tests and demos.
    Its images are noise; it exercises the plumbing, not the quality."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size,
                                    in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                    norm_num_groups=4, attention_head_dim=4)
        vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
                            sample_size=sample_size * 2)
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                            intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                            vocab_size=100, max_position_embeddings=16, projection_dim=16))
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


"""FK steering of a diffusers ``StableDiffusionPipeline``, through its components.

No pipeline code is copied: the pipeline's own ``encode_prompt``, ``unet``, ``vae`` and
scheduler config are wrapped into what a ``DiffusionModel`` needs::

    denoiser(latents, t, cond)  UNet with classifier-free guidance,
                                eps = eps_u + g (eps_c - eps_u); cond = per-particle prompt embeddings
    decode(latents)             VAE decode of x0 predictions to images in [0, 1] (what the reward reads)
    scheduler                   the pipeline's, if DDPM/DDIM; otherwise DDIM built from its config
                                (stochastic, eta = 1 by default)

and the dynamics run on latents. The per-particle prompt embeddings ride in the particle
state, so resampling moves each latent together with its own conditioning (one prompt per
particle is allowed; particles then compete across prompts, which targets the tilted
mixture over prompts; run one call per prompt to steer each prompt separately).

    model = stable_diffusion_model(pipe, "a photo of a cat", num_particles=4, num_inference_steps=50)
    out = steer_stable_diffusion(pipe, "a photo of a cat", reward, num_particles=4, lam=10.0,
                                 num_inference_steps=50, resample_every=5, t_start=5, t_end=30, seed=0)
    out.info["images"]  # (N, 3, H, W) images in [0, 1];  out.particles.x: the latents
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ppl_scaling.result import SMCResult
from ppl_scaling.samplers.fk_steering import fk_steering

from .model import DiffusionModel

__all__ = ["StableDiffusionDenoiser", "VAEDecoder", "stochastic_scheduler", "stable_diffusion_parts",
           "stable_diffusion_model", "steer_stable_diffusion"]

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


def stable_diffusion_model(pipe: Any, prompt: str | list[str], num_particles: int, *, num_inference_steps: int = 50,
                           guidance_scale: float = 7.5, negative_prompt: str | None = None,
                           height: int | None = None, width: int | None = None, eta: float = 1.0,
                           scheduler: Any = None) -> DiffusionModel:
    """The pipeline's reverse diffusion on latents as a ``DiffusionModel`` for ``num_particles``
    particles (one prompt, or one per particle), decoding to images in [0, 1]."""
    denoiser, decode, cond, shape = stable_diffusion_parts(pipe, prompt, num_particles, negative_prompt=negative_prompt,
                                                           guidance_scale=guidance_scale, height=height, width=width)
    return DiffusionModel(denoiser, scheduler or stochastic_scheduler(pipe.scheduler), shape,
                          num_inference_steps=num_inference_steps, eta=eta, decode=decode, cond=cond,
                          device=pipe._execution_device, dtype=pipe.unet.dtype)


def steer_stable_diffusion(pipe: Any, prompt: str | list[str], reward: Any, *, num_particles: int = 4,
                           lam: float = 1.0, shape: str = "difference", num_inference_steps: int = 50,
                           guidance_scale: float = 7.5, negative_prompt: str | None = None,
                           height: int | None = None, width: int | None = None, eta: float = 1.0,
                           scheduler: Any = None, seed: int | None = None, rng: np.random.Generator | None = None,
                           **options: Any) -> SMCResult:
    """Prompt -> FK-steered images: ``fk_steering`` of ``stable_diffusion_model`` by ``reward`` (a
    ``Potential`` or a function of images (N, 3, H, W) in [0, 1] -> (N,) log-values); ``options``
    are ``fk_steering``'s (resample_every, t_start, t_end, ess_threshold, store_history, ...).
    The result's particles hold the latents; ``info["images"]`` the decoded final images."""
    model = stable_diffusion_model(pipe, prompt, num_particles, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, negative_prompt=negative_prompt, height=height,
                                   width=width, eta=eta, scheduler=scheduler)
    res = fk_steering(model, num_particles, potential=reward, shape=shape, lam=lam, seed=seed, rng=rng, **options)
    res.info.update(images=model.readable(res.particles.x), prompt=prompt, guidance_scale=guidance_scale)
    return res

"""Steering diffusers text-to-image pipelines: ``steer(pipe, prompt, reward, ...)``.

No pipeline code runs or is copied: the pipeline's own ``encode_prompt``, denoising network,
VAE, scheduler config and image processor are wrapped into dynamics on latents, and any
``ppl_scaling.samplers`` method (FK steering by default) runs on them. Families:

    family        pipeline                     dynamics            the network conditions on
    SD 1.x/2.x    StableDiffusionPipeline      DiffusionModel      prompt_embeds (CLIP hidden states)
    SDXL          StableDiffusionXLPipeline    DiffusionModel      prompt_embeds (two CLIPs) + added_cond_kwargs
                                                                   text_embeds (pooled CLIP-2), time_ids
                                                                   (H, W, 0, 0, H, W)
    SD3           StableDiffusion3Pipeline     FlowMatchingModel   prompt_embeds (CLIPs + T5) + pooled_projections;
                                                                   timestep = 1000 t
    Flux          FluxPipeline                 FlowMatchingModel   prompt_embeds (T5) + pooled_projections (CLIP),
                                                                   txt_ids, img_ids, guidance embedding; timestep = t

Classifier-free guidance (SD, SDXL, SD3, ``guidance_scale > 1``) is ε = ε_u + g (ε_c - ε_u) (v
likewise for SD3): one batched network call on [uncond; cond], counted as 2 NFEs per particle.
Flux-dev has no unconditional branch: ``guidance_scale`` feeds its guidance embedding (1 NFE).

Stochasticity. SD and SDXL run the pipeline's scheduler if DDPM/DDIM, else DDIM from its config
with ``eta`` (1 by default: DDPM-like). SD3 and Flux are rectified flows; their Euler ODE sampler
is deterministic, so resampled copies would never diverge. ``FlowMatchingModel`` samples them by
the SDE with the ODE's marginals (``noise_level`` η, Flow-GRPO's g; ``diffusion.flow``), on the
pipeline's grid: its scheduler's shift, Flux's base sigmas linspace(1, 1/K, K) and dynamic shift
mu = calculate_shift(image tokens) from the scheduler config. Flux's state is the unpacked latent
(N, C, h, w); the velocity packs it into the transformer's 2x2 patches and unpacks the output.

Conditioning. One prompt (a string): its embeddings are encoded once and shared by all particles
(held by the denoiser, broadcast at each call); resampling reindexes only the latents. One prompt
per particle (a list of N): the embeddings ride in the particle state (``DiffusionState.cond``) and
move with their latents on resampling; particles then compete across prompts (the tilted mixture
over prompts; call once per prompt to steer each separately). Negative prompts are shared.

The reward reads decoded images (N, 3, H, W) in [0, 1]: at each step the x0 predictions
x0_hat(x_t), at the end the samples, decoded by the pipeline's VAE with its scaling and shift
factors (``diffusion.rewards``: brightness, JPEG, classifier, CLIP / aesthetic loaders; or any
``Potential`` or function of images -> (N,) log-values).

    out = steer(pipe, "a photo of a cat", reward, num_particles=4, lam=10.0, num_inference_steps=50,
                seed=0, resample_every=5, t_start=5, t_end=30)
    out.images                  # N PIL images (the final particles), as ``pipe(...).images``
    out.result                  # the SMCResult: weights, log_evidence, ledger (nfe, reward_calls), rewards;
                                # particles.x the latents, info["images"] the images as a tensor in [0, 1]
    out.images[out.result.best_index]

``pipeline_model(pipe, prompt, num_particles, ...)`` returns the dynamics themselves, for any method.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ppl_scaling.ledger import record
from ppl_scaling.result import SMCResult
from ppl_scaling.rng import as_generator

from .model import DenoisingDynamics, DiffusionModel

__all__ = ["SteeringOutput", "GuidedDenoiser", "UNetCall", "SD3TransformerCall", "FluxTransformerCall", "VAEDecoder",
           "pipeline_family", "stochastic_scheduler", "pack_latents", "unpack_latents", "pipeline_model",
           "stable_diffusion_model", "steer", "steer_stable_diffusion"]

_STOCHASTIC_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# family -> (num_inference_steps, guidance_scale, max_sequence_length): the pipelines' defaults
_DEFAULTS = {"sd": (50, 7.5, None), "sdxl": (50, 5.0, None), "sd3": (28, 7.0, 256), "flux": (28, 3.5, 512)}
_MAX_SHIFT = {"sd3": 1.16, "flux": 1.15}

Cond = dict[str, torch.Tensor]


@dataclass
class SteeringOutput:
    """What ``steer`` returns: ``images`` (PIL, one per final particle, like ``pipe(...).images``)
    and ``result``, the method's ``SMCResult`` (weights, log Z, ledger, rewards, latents)."""

    images: list[Any]
    result: SMCResult


def _rows(cond: Cond, n: int) -> Cond:
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


class GuidedDenoiser:
    """``denoiser(x, t, cond=None)`` of a network ``net(x, t, c)`` (``c``: conditioning dict, one row per
    sample) with classifier-free guidance: out_u + g (out_c - out_u), out_u from the shared ``negative``
    conditioning, in one batched call (recorded as N NFEs more than the N the dynamics record).

    ``cond`` (per-particle rows, from the state) or else ``shared`` (1 row, broadcast) is the
    conditional input; ``negative=None`` runs the conditional network only.
    """

    def __init__(self, net: Callable[[torch.Tensor, Any, Cond], torch.Tensor], shared: Cond | None,
                 negative: Cond | None, guidance_scale: float) -> None:
        self.net = net
        self.shared = shared
        self.negative = negative
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: torch.Tensor, t: Any, cond: Cond | None = None) -> torch.Tensor:
        N = x.shape[0]
        c = _rows(self.shared, N) if cond is None else cond
        rows = next(iter(c.values())).shape[0]
        if rows != N:
            raise ValueError(f"{rows} rows of conditioning for {N} latents; "
                             "conditioning must have one row per particle")
        if self.negative is None:
            return self.net(x, t, c)
        u = _rows(self.negative, N)
        out = self.net(torch.cat([x, x]), t, {k: torch.cat([u[k], v]) for k, v in c.items()})
        record(nfe=N)  # the unconditional half of the batch
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)


class UNetCall:
    """SD / SDXL UNet: eps = unet(x, timestep, prompt_embeds[, text_embeds = pooled, time_ids])."""

    def __init__(self, unet: Any, time_ids: torch.Tensor | None = None) -> None:
        self.unet = unet
        self.time_ids = time_ids

    def __call__(self, x: torch.Tensor, t: Any, c: Cond) -> torch.Tensor:
        added = None if self.time_ids is None else {"text_embeds": c["pooled_prompt_embeds"],
                                                     "time_ids": self.time_ids.expand(x.shape[0], -1)}
        return self.unet(x, t, encoder_hidden_states=c["prompt_embeds"], added_cond_kwargs=added, return_dict=False)[0]


class SD3TransformerCall:
    """SD3 transformer: v(x, t) = transformer(x, timestep = t * num_train_timesteps, prompt_embeds, pooled)."""

    def __init__(self, transformer: Any, num_train_timesteps: int) -> None:
        self.transformer = transformer
        self.num_train_timesteps = int(num_train_timesteps)

    def __call__(self, x: torch.Tensor, t: float, c: Cond) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), t * self.num_train_timesteps, device=x.device, dtype=x.dtype)
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=c["prompt_embeds"],
                                pooled_projections=c["pooled_prompt_embeds"], return_dict=False)[0]


class FluxTransformerCall:
    """Flux transformer on unpacked latents (N, C, h, w): v(x, t) = unpack(transformer(pack(x),
    timestep = t, guidance, pooled, prompt_embeds, txt_ids, img_ids)); img_ids[(i, j)] = (0, i, j) for the
    2x2 patch in row i, column j; ``guidance`` (Flux-dev's embedding) None for models without it."""

    def __init__(self, transformer: Any, txt_ids: torch.Tensor, latent_hw: tuple[int, int], guidance: float | None
                 ) -> None:
        self.transformer = transformer
        self.txt_ids = txt_ids
        h, w = latent_hw[0] // 2, latent_hw[1] // 2
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        self.img_ids = ids.reshape(h * w, 3).to(device=txt_ids.device, dtype=txt_ids.dtype)
        self.guidance = guidance

    def __call__(self, x: torch.Tensor, t: float, c: Cond) -> torch.Tensor:
        N = x.shape[0]
        timestep = torch.full((N,), t, device=x.device, dtype=x.dtype)
        guidance = None if self.guidance is None else torch.full((N,), self.guidance, device=x.device,
                                                                 dtype=torch.float32)
        out = self.transformer(hidden_states=pack_latents(x), timestep=timestep, guidance=guidance,
                               pooled_projections=c["pooled_prompt_embeds"], encoder_hidden_states=c["prompt_embeds"],
                               txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False)[0]
        return unpack_latents(out, x.shape)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, (h/2)(w/2), 4C): Flux's 2x2 patch tokens, row-major, channel-major in a patch."""
    N, C, h, w = x.shape
    return x.view(N, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(N, (h // 2) * (w // 2), 4 * C)


def unpack_latents(z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``shape`` (N, C, h, w)."""
    N, C, h, w = shape
    return z.view(N, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(N, C, h, w)


class VAEDecoder:
    """Latents -> images in [0, 1]: ``vae.decode(z)`` rescaled from [-1, 1], with z = x std / s + mean
    (VAE configs with ``latents_mean`` / ``latents_std``) or x / s + shift (s = ``scaling_factor``,
    shift = ``shift_factor`` or 0)."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        s = float(config.scaling_factor)
        if mean is not None and std is not None:
            self.scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) / s
            self.shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        else:
            self.scale = torch.tensor(1.0 / s)
            self.shift = torch.tensor(float(getattr(config, "shift_factor", None) or 0.0))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.scale.to(latents.device) + self.shift.to(latents.device)
        with torch.no_grad():
            images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def pipeline_family(pipe: Any) -> str:
    """The family of a diffusers text-to-image pipeline: "sd", "sdxl", "sd3" or "flux"."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    for cls, family in ((StableDiffusionPipeline, "sd"), (StableDiffusionXLPipeline, "sdxl"),
                        (StableDiffusion3Pipeline, "sd3"), (FluxPipeline, "flux")):
        if isinstance(pipe, cls):
            return family
    raise TypeError(f"steering supports StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline "
                    f"and FluxPipeline, got {type(pipe).__name__}")


def stochastic_scheduler(pipe_scheduler: Any) -> Any:
    """The pipeline's scheduler if DDPM/DDIM, else a DDIMScheduler from its config (use eta > 0)."""
    if type(pipe_scheduler).__name__ in _STOCHASTIC_SCHEDULERS:
        return pipe_scheduler
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe_scheduler.config)


def _encode(pipe: Any, family: str, prompts: list[str], negative_prompt: str | None, guided: bool,
            max_sequence_length: int | None, device: torch.device) -> tuple[Cond, Cond | None, torch.Tensor | None]:
    """(conditioning with one row per prompt, the negative's (1 row) or None, Flux's txt_ids or None)."""
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    with torch.no_grad():
        if family == "sd":
            emb, neg = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=negative)
            return {"prompt_embeds": emb}, {"prompt_embeds": neg[:1]} if guided else None, None
        if family == "flux":
            if negative_prompt is not None:
                raise ValueError("FluxPipeline steering has no negative prompt (Flux-dev guides by its guidance "
                                 "embedding, guidance_scale)")
            emb, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                      max_sequence_length=max_sequence_length)
            return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}, None, txt_ids
        extra = {} if family == "sdxl" else {"prompt_3": None, "max_sequence_length": max_sequence_length}
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                          num_images_per_prompt=1, do_classifier_free_guidance=guided,
                                                          negative_prompt=negative, **extra)
    cond = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}
    return cond, {"prompt_embeds": neg[:1], "pooled_prompt_embeds": neg_pooled[:1]} if guided else None, None


def _dynamic_shift(config: Any, family: str, image_seq_len: int) -> float | None:
    """mu = calculate_shift(image tokens, ...) for scheduler configs with ``use_dynamic_shifting`` (Flux), else None."""
    if not config.get("use_dynamic_shifting", False):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", _MAX_SHIFT[family])))


def pipeline_model(pipe: Any, prompt: str | list[str], num_particles: int, *, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, negative_prompt: str | None = None,
                   height: int | None = None, width: int | None = None, max_sequence_length: int | None = None,
                   eta: float = 1.0, noise_level: float = 0.7, scheduler: Any = None,
                   **options: Any) -> DenoisingDynamics:
    """The pipeline's sampler on latents as dynamics for ``num_particles`` particles (module docstring):
    a ``DiffusionModel`` (SD, SDXL; ``eta``) or a ``FlowMatchingModel`` (SD3, Flux; ``noise_level``),
    decoding to images in [0, 1]. ``prompt``: one (shared) or one per particle. Defaults of
    ``num_inference_steps``, ``guidance_scale``, ``max_sequence_length``, height and width are the
    pipeline's; ``scheduler`` replaces its scheduler; ``options`` go to the dynamics (``intermediate``,
    ``num_x0_samples``, ``x0_std``, ``allow_deterministic``)."""
    from .flow import FlowMatchingModel

    family = pipeline_family(pipe)
    steps, default_guidance, default_length = _DEFAULTS[family]
    num_inference_steps = steps if num_inference_steps is None else num_inference_steps
    guidance_scale = default_guidance if guidance_scale is None else float(guidance_scale)
    max_sequence_length = max_sequence_length or default_length
    if isinstance(prompt, str):
        prompts, inverse = [prompt], None
    else:
        if len(prompt) != num_particles:
            raise ValueError(f"got {len(prompt)} prompts for {num_particles} particles; "
                             "give one prompt or one per particle")
        prompts = list(dict.fromkeys(prompt))  # each distinct prompt encoded once
        inverse = [prompts.index(p) for p in prompt]
    guided = family != "flux" and guidance_scale > 1.0
    device = pipe._execution_device
    cond, negative, txt_ids = _encode(pipe, family, prompts, negative_prompt, guided, max_sequence_length, device)
    shared = cond if inverse is None else None
    per_particle = None if inverse is None else {k: v[inverse] for k, v in cond.items()}

    net = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    vsf = pipe.vae_scale_factor
    size = getattr(pipe, "default_sample_size", None) or net.config.sample_size
    height, width = height or size * vsf, width or size * vsf
    multiple = vsf * (net.config.patch_size if family == "sd3" else 2 if family == "flux" else 1)
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this pipeline, got {height}x{width}")
    h, w = height // vsf, width // vsf
    common = dict(num_inference_steps=num_inference_steps, decode=VAEDecoder(pipe.vae), cond=per_particle,
                  device=device, dtype=net.dtype, **options)
    if family in ("sd", "sdxl"):
        time_ids = None
        if family == "sdxl":
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond["prompt_embeds"].dtype,
                                    device=cond["prompt_embeds"].device)
        denoiser = GuidedDenoiser(UNetCall(net, time_ids), shared, negative, guidance_scale)
        return DiffusionModel(denoiser, scheduler or stochastic_scheduler(pipe.scheduler),
                              (net.config.in_channels, h, w), eta=eta, **common)
    scheduler = scheduler or pipe.scheduler
    if family == "sd3":
        call = SD3TransformerCall(net, scheduler.config.num_train_timesteps)
        p = net.config.patch_size
        shape, seq_len, sigmas = (net.config.in_channels, h, w), (h // p) * (w // p), None
    else:
        guidance = guidance_scale if net.config.guidance_embeds else None
        call = FluxTransformerCall(net, txt_ids, (h, w), guidance)
        shape, seq_len = (net.config.in_channels // 4, h, w), (h // 2) * (w // 2)
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else \
            np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
    return FlowMatchingModel(GuidedDenoiser(call, shared, negative, guidance_scale), shape,
                             scheduler=scheduler, mu=_dynamic_shift(scheduler.config, family, seq_len),
                             sigmas=sigmas, noise_level=noise_level, **common)


stable_diffusion_model = pipeline_model  # the name of the SD-only version


def _run_rng(seed: int | None, generator: torch.Generator | None, rng: np.random.Generator | None
             ) -> np.random.Generator:
    """The run's numpy stream: from ``seed`` or ``rng``, or seeded by one 63-bit draw of a torch ``generator``
    (which advances it, as a pipeline call does)."""
    if generator is None:
        return as_generator(seed, rng)
    if seed is not None or rng is not None:
        raise ValueError("pass one of seed, rng and generator")
    return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device)))


def steer(pipe: Any, prompt: str | list[str], reward: Any, *, num_particles: int = 4, lam: float = 1.0,
          num_inference_steps: int | None = None, seed: int | None = None, generator: torch.Generator | None = None,
          rng: np.random.Generator | None = None, height: int | None = None, width: int | None = None,
          guidance_scale: float | None = None, negative_prompt: str | None = None,
          max_sequence_length: int | None = None, eta: float = 1.0, noise_level: float = 0.7, scheduler: Any = None,
          method: str = "fk_steering", **method_options: Any) -> SteeringOutput:
    """Prompt -> steered images: ``method`` (a ``ppl_scaling.samplers.METHODS`` name, FK steering by
    default) on ``pipeline_model(pipe, prompt, num_particles, ...)``, tilted by ``reward`` toward
    p(x | prompt) exp(lam r(x)) (``lam`` goes to methods that take it); ``method_options`` are the
    method's (FK: resample_every, t_start, t_end, ess_threshold, shape, store_history, ...).
    Randomness: ``seed``, a numpy ``rng`` or a torch ``generator``. Returns ``SteeringOutput``:
    PIL ``images`` of the final particles (decoded by the pipeline's VAE and image processor) and
    the ``result`` (``info["images"]``: the same images as a tensor in [0, 1])."""
    from ppl_scaling.samplers import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    run = METHODS[method]
    if "lam" in inspect.signature(run).parameters:
        method_options["lam"] = lam
    elif lam != 1.0:
        raise ValueError(f"{method} takes no lam")
    model = pipeline_model(pipe, prompt, num_particles, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, negative_prompt=negative_prompt, height=height, width=width,
                           max_sequence_length=max_sequence_length, eta=eta, noise_level=noise_level,
                           scheduler=scheduler)
    res = run(model, num_particles, potential=reward, rng=_run_rng(seed, generator, rng), **method_options)
    images = model.readable(res.particles.x)
    res.info.update(images=images, prompt=prompt, pipeline=pipeline_family(pipe))
    pil = pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[False] * images.shape[0])
    return SteeringOutput(images=pil, result=res)


def steer_stable_diffusion(pipe: Any, prompt: str | list[str], reward: Any, **options: Any) -> SMCResult:
    """``steer(pipe, prompt, reward, **options).result``: the ``SMCResult`` alone (images in ``info["images"]``)."""
    return steer(pipe, prompt, reward, **options).result

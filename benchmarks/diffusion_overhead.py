"""FK steering overhead vs plain batched sampling, and the finite-N bias of the FK shapes.

Part 1 (overhead). The same tiny UNet2DModel (1x8x8, channels 32/64, random weights: the
cost, not the quality, matters), the same N particles and K DDIM (eta=1) steps:

    plain      x = randn; for t: eps = unet(x, t); x = scheduler.step(eps, t, x)  (a 5-line loop)
    FK         fk_steering: Tilted(DiffusionModel) + the SMC engine, resampling at every step (worst case)
    FK sched   FK's published schedule: resample every 5 loop steps from 5 to 30 (of K), reward only there

"reward excluded" uses a zero-cost reward (engine overhead only); "reward included" a small
CNN classifier reward on the x0 predictions, against plain sampling + one final reward
call (best-of-N's cost). Times are process CPU seconds (one torch thread), the median of
interleaved repeats: on a shared machine CPU time is far less noisy than wall time. A last
line runs both loops with a zero-cost denoiser: the engine's absolute cost per step.

Part 2 (pipelines). Tiny random SDXL and SD3 pipelines (tests/diffusion_fixtures.py), N images of
HxW, K steps, one prompt with classifier-free guidance, 1 torch thread, process CPU seconds, minima over
interleaved repeats:

    plain      pipe(prompt, num_images_per_prompt=N, num_inference_steps=K): text encoding, K guided
               steps, the VAE decode and PIL conversion (SDXL on the same DDIM, eta = 1)
    FK         steer(pipe, prompt, zero reward, num_particles=N, ...) with resampling at every step (worst
               case), and FK's sparse schedule; "reward excluded" subtracts the VAE decodes of the x0
               predictions the reward reads (all decodes but steer's final one), timed as they run

Part 3 (shape bias). The analytic 1-D mixture 0.5 N(-1.5, .5²) + 0.5 N(1.5, .5²), reward r(x) = x,
lam = 0.578: the exact tilted right-mode weight is 0.85 (the DDPM sampler's own tilt, the
reference column, is estimated from 100k base samples). Mean over replicates of the weighted
right-mode mass for each shape, N and schedule; and the same for FK-Diffusion-Steering's
adaptive resampling as its code runs it (weights dropped at steps without resampling).

    .venv/bin/python benchmarks/diffusion_overhead.py            # all parts
    .venv/bin/python benchmarks/diffusion_overhead.py --part overhead
    .venv/bin/python benchmarks/diffusion_overhead.py --part pipelines --particles 8 --steps 20 --repeats 5
    .venv/bin/python benchmarks/diffusion_overhead.py --quick    # a smoke run (numbers meaningless)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ppl_scaling as pps
from ppl_scaling.diffusion.gmm import GaussianMixture, LinearReward
from ppl_scaling.diffusion.model import DiffusionModel
from ppl_scaling.resampling import get_scheme
from ppl_scaling.samplers.fk_steering import fk_steering
from ppl_scaling.state import take
from ppl_scaling.tilt import Tilted
from ppl_scaling.weights import ess, normalise

ROOT = Path(__file__).resolve().parents[1]


def tiny_unet():
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           layers_per_block=1, norm_num_groups=8).eval()


def tiny_classifier():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                                   torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()


def plain_sampling(unet, scheduler, N, K, seed, reward=None):
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(K)
    x = torch.randn((N, 1, 8, 8), generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t)
            x = scheduler.step(getattr(out, "sample", out), t, x, eta=1.0, generator=g).prev_sample
        if reward is not None:
            reward(x)
    return x


def overhead(N: int, K: int, repeats: int) -> None:
    from diffusers import DDIMScheduler

    from ppl_scaling.diffusion.rewards import ClassifierReward

    unet, sched = tiny_unet(), DDIMScheduler()
    clf = ClassifierReward(tiny_classifier(), target=3)
    zero = lambda x: torch.zeros(x.shape[0])  # noqa: E731
    model = DiffusionModel(unet, sched, (1, 8, 8), num_inference_steps=K)

    def fk(reward, denoiser_model=model, **kw):
        return lambda s: fk_steering(denoiser_model, N, potential=reward, lam=1.0, seed=s, **kw)

    every, schedule = {"ess_threshold": 1.0}, {"resample_every": 5, "t_start": 5, "t_end": 30}
    null = lambda x, t: torch.zeros_like(x)  # noqa: E731
    runs = {
        "plain": lambda s: plain_sampling(unet, sched, N, K, s),
        "plain + final reward": lambda s: plain_sampling(unet, sched, N, K, s, clf),
        "FK, every step, reward excluded": fk(zero, **every),
        "FK, every step, reward included": fk(clf, **every),
        "FK schedule 5..30/5, reward excluded": fk(zero, **schedule),
        "FK schedule 5..30/5, reward included": fk(clf, **schedule),
        "plain, zero-cost denoiser": lambda s: plain_sampling(null, sched, N, K, s),
        "FK, every step, zero-cost denoiser and reward": fk(
            zero, DiffusionModel(null, sched, (1, 8, 8), num_inference_steps=K), **every),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, f in runs.items():  # warm-up
        f(0)
    for r in range(repeats):
        for name, f in runs.items():
            t0 = time.process_time()
            f(r)
            times[name].append(time.process_time() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base, base_r = med["plain"], med["plain + final reward"]
    print(f"\n### FK steering overhead: tiny UNet2DModel 1x8x8, N={N}, K={K} DDIM eta=1 steps, "
          f"median of {repeats}, torch threads={torch.get_num_threads()}\n")
    print("| run | time (s) | ratio vs plain | ratio vs plain + final reward |")
    print("| --- | ---: | ---: | ---: |")
    for k, v in list(med.items())[:-2]:
        print(f"| {k} | {v:.3f} | {v / base:.3f} | {v / base_r:.3f} |")
    per_step = (med["FK, every step, zero-cost denoiser and reward"] - med["plain, zero-cost denoiser"]) / K
    print(f"\nEngine cost per step with a zero-cost denoiser and reward (resampling every step): "
          f"{1e3 * per_step:.2f} ms more than the plain loop ({1e3 * med['plain, zero-cost denoiser'] / K:.2f} ms/step); "
          f"the UNet step costs {1e3 * base / K:.2f} ms.")


class TimedDecode:
    """Wraps ``vae.decode``, recording the process time of each call."""

    def __init__(self, decode) -> None:
        self.decode, self.times = decode, []

    def __call__(self, *args, **kwargs):
        t0 = time.process_time()
        out = self.decode(*args, **kwargs)
        self.times.append(time.process_time() - t0)
        return out


def pipelines(N: int, K: int, size: int, repeats: int) -> None:
    from ppl_scaling.diffusion.pipelines import steer, stochastic_scheduler

    sys.path.insert(0, str(ROOT / "tests"))
    from diffusion_fixtures import tiny_sd3_pipeline, tiny_sdxl_pipeline

    zero = lambda x: torch.zeros(x.shape[0])  # noqa: E731
    prompt, kw = "a photo of a cat", dict(height=size, width=size, num_inference_steps=K, guidance_scale=5.0)
    sparse = {"resample_every": max(1, K // 10), "t_start": max(1, K // 10), "t_end": (3 * K) // 5}
    print(f"\n### FK steering of tiny diffusers pipelines: N={N} images {size}x{size}, K={K} steps, CFG, "
          f"min of {repeats} interleaved repeats, torch threads={torch.get_num_threads()}\n")
    rows, notes = ["| pipeline | run | time (s) | ratio vs plain |", "| --- | --- | ---: | ---: |"], []
    for name, pipe, extra in (("SDXL", tiny_sdxl_pipeline(), {}),
                              ("SD3", tiny_sd3_pipeline(), {"max_sequence_length": 16})):
        pipe.set_progress_bar_config(disable=True)
        if name == "SDXL":
            pipe.scheduler = stochastic_scheduler(pipe.scheduler)
            extra_plain = {"eta": 1.0}
        else:
            extra_plain = {}
        timer = TimedDecode(pipe.vae.decode)
        pipe.vae.decode = timer

        def plain(s):
            pipe(prompt, num_images_per_prompt=N, generator=torch.Generator().manual_seed(s), **kw, **extra,
                 **extra_plain)

        def fk(options):
            return lambda s: steer(pipe, prompt, zero, num_particles=N, seed=s, **kw, **extra, **options)

        runs = {"plain": plain, "FK, every step": fk({"ess_threshold": 1.0}),
                f"FK schedule {sparse['t_start']}..{sparse['t_end']}/{sparse['resample_every']}": fk(sparse)}
        total: dict[str, list[float]] = {k: [] for k in runs}
        excluded: dict[str, list[float]] = {k: [] for k in runs}
        for f in runs.values():  # warm-up
            f(0)
        for r in range(repeats):
            for k, f in runs.items():
                timer.times.clear()
                t0 = time.process_time()
                f(r)
                total[k].append(time.process_time() - t0)
                excluded[k].append(total[k][-1] - sum(timer.times[:-1]))  # all decodes but the final one
        base = min(total["plain"])
        rows.append(f"| {name} | plain | {base:.3f} | 1.000 |")
        for k in list(runs)[1:]:
            t, e = min(total[k]), min(excluded[k])
            rows.append(f"| {name} | {k}, reward + x0 decodes included | {t:.3f} | {t / base:.3f} |")
            rows.append(f"| {name} | {k}, reward excluded | {e:.3f} | {e / base:.3f} |")
        extra_ms = 1e3 * (min(excluded["FK, every step"]) - base) / K
        notes.append(f"{name}: FK (every step, reward excluded) costs {extra_ms:.2f} ms per step more than the "
                     f"pipeline, whose whole run is {1e3 * base / K:.2f} ms per step.")
        del pipe.vae.decode
    print("\n".join(rows) + "\n\n" + "\n".join(notes))


def fk_reference_adaptive(fk: Tilted, N: int, rng: np.random.Generator) -> np.ndarray:
    """FK-Diffusion-Steering's adaptive mode as its code runs it (open issue #12): at each step
    resample by this step's potential alone if its ESS < N/2, otherwise keep the particles and
    *drop* the weights; the output is unweighted. Returns the final samples."""
    state = fk.M0(N, rng)
    for t in range(1, fk.T + 1):
        lw = state.logG
        if ess(lw) < 0.5 * N:
            state = take(state, get_scheme("multinomial")(rng, normalise(lw)))
        if t < fk.T:
            state = fk.M(t, state, rng)
    return state.x.numpy()


def shape_bias(Ns: list[int], K: int, replicates: int, base_samples: int = 100_000) -> None:
    from diffusers import DDPMScheduler

    gmm = GaussianMixture.isotropic([0.5, 0.5], [[-1.5], [1.5]], std=0.5)
    sched, reward, lam = DDPMScheduler(clip_sample=False), LinearReward([1.0]), 0.578
    exact = gmm.tilt(reward, lam)[0].weights[1]
    model = DiffusionModel(gmm.denoiser(sched), sched, (1,), num_inference_steps=K, dtype=torch.float64)
    base = pps.smc(model, base_samples, ess_threshold=0.0, seed=123).particles.x.numpy()
    u = np.exp(lam * base[:, 0])
    ref = float(u @ gmm.responsibilities(base)[:, 1] / u.sum())
    schedules = {"reward every step, ESS < N/2": {"ess_threshold": 0.5},
                 f"FK sparse: resample every 10 of {K}, reward there": {"resample_every": 10, "t_start": 10}}
    print(f"\n### Right-mode weight of the steered population (exact data tilt {exact:.3f}, "
          f"sampler's own tilt {ref:.3f}, {base_samples} base samples); mean ± s.e. over {replicates} runs, "
          f"K={K} DDPM steps\n")
    print("| schedule | N | difference | max | sum | last |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for sname, kw in schedules.items():
        for N in Ns:
            cells = []
            for shape in ("difference", "max", "sum", "last"):
                est = []
                for r in range(replicates):
                    o = fk_steering(model, N, potential=reward, lam=lam, shape=shape, seed=r, **kw)
                    est.append(float(o.weights @ gmm.responsibilities(o.particles.x.numpy())[:, 1]))
                cells.append(f"{np.mean(est):.3f} ± {np.std(est, ddof=1) / np.sqrt(replicates):.3f}")
            print(f"| {sname} | {N} | " + " | ".join(cells) + " |")
    print("\n| FK-Diffusion-Steering's adaptive mode (weights dropped when ESS >= N/2), difference | N | right-mode weight |")
    print("| --- | ---: | ---: |")
    fk = Tilted(model, reward, lam=lam)
    for N in Ns:
        est = [float(gmm.responsibilities(fk_reference_adaptive(fk, N, np.random.default_rng(r)))[:, 1].mean())
               for r in range(replicates)]
        print(f"| reference scheme, reward every step | {N} | {np.mean(est):.3f} ± {np.std(est, ddof=1) / np.sqrt(replicates):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["overhead", "pipelines", "bias", "all"], default="all")
    p.add_argument("--particles", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--replicates", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="pipelines: image height and width")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, meaningless numbers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.particles, args.steps, args.repeats, args.replicates = 4, 10, 1, 2
    if args.part in ("overhead", "all"):
        overhead(args.particles, args.steps, args.repeats)
    if args.part in ("pipelines", "all"):
        pipelines(min(args.particles, 8) if args.part == "all" else args.particles, min(args.steps, 20)
                  if args.part == "all" else args.steps, 32 if args.quick else args.size, args.repeats)
    if args.part in ("bias", "all"):
        if args.quick:
            shape_bias([16], 10, args.replicates, base_samples=2000)
        else:
            shape_bias([64, 256, 1024], 50, args.replicates)


if __name__ == "__main__":
    main()

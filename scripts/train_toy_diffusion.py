"""Train the bundled toy image-diffusion assets (offline, CPU, a few minutes).

    python scripts/train_toy_diffusion.py [--steps 1000] [--threads 1] [--out diffusion/assets]

1. Split scikit-learn's 1797 digits with a fixed seed into A (750), B (750) and a
   test set (297).
2. Reward classifier (``DigitMLP``) on A, with augmentation towards what it will
   score during steering: images shrunk towards the mean digit (early, blurry x0
   predictions) plus Gaussian pixel noise. Evaluation classifier (``DigitCNN``) on B,
   another seed and architecture.
3. DDPM: ``UNet2DModel`` (8x8x1, epsilon prediction) on all digits, data in [-1, 1],
   ``DDPMScheduler(1000, "squaredcos_cap_v2")``, AdamW with cosine decay, EMA weights saved.
4. ``metrics.json``: classifier test accuracies, and the evaluation classifier's
   confidence on 64 unsteered DDPM samples (also saved as ``digits_samples.png``).

Every random choice derives from one seed (``--seed``); weight initialisation
runs under ``torch_global_seed`` so the global torch RNG is left untouched.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ppl_scaling.diffusion import toy
from ppl_scaling.rng import torch_generator, torch_global_seed


def split_indices(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    perm = rng.permutation(n)
    return {"A": perm[:750], "B": perm[750:1500], "test": perm[1500:]}


def augment(x: torch.Tensor, mean: torch.Tensor, g: torch.Generator, max_noise: float, shrink: bool) -> torch.Tensor:
    """Shrink towards the mean digit by a random a in [0.3, 1] (half the batch, if ``shrink``)
    and add N(0, s^2) pixel noise with s ~ U(0, max_noise); clip to [-1, 1]."""
    B = x.shape[0]
    if shrink:
        a = 0.3 + 0.7 * torch.rand(B, 1, 1, 1, generator=g)
        a = torch.where(torch.rand(B, 1, 1, 1, generator=g) < 0.5, a, torch.ones_like(a))
        x = a * x + (1 - a) * mean
    s = max_noise * torch.rand(B, 1, 1, 1, generator=g)
    return (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *,
                     epochs: int, max_noise: float, shrink: bool) -> torch.nn.Module:
    g = torch_generator(rng)
    mean = x.mean(0, keepdim=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(augment(x[idx], mean, g, max_noise, shrink)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def make_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def train_ddpm(unet, scheduler, x: torch.Tensor, rng: np.random.Generator, *, steps: int, batch: int = 128):
    """Epsilon-prediction DDPM loss; returns the EMA copy of the weights."""
    g = torch_generator(rng)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    T = scheduler.config.num_train_timesteps
    unet.train()
    start = time.perf_counter()
    for step in range(steps):
        x0 = x[torch.randint(len(x), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(T, (batch,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            print(f"  ddpm step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    return ema.eval()


def sample_quality(unet, scheduler, judge, rng: np.random.Generator, n: int = 64, steps: int = 50):
    images = toy.sample_digits(n, num_inference_steps=steps, rng=rng, unet=unet, scheduler=scheduler)
    probs = toy.classify(images, judge)
    conf = probs.max(-1).values
    counts = np.bincount(probs.argmax(-1).numpy(), minlength=10)
    return images, {"num_samples": n, "num_inference_steps": steps, "sampler": "DDPM",
                    "eval_mean_confidence": round(float(conf.mean()), 4),
                    "eval_share_confidence_above_0.9": round(float((conf > 0.9).float().mean()), 4),
                    "eval_class_counts": counts.tolist()}


def save_grid(images: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, np.kron(toy.image_grid(images), np.ones((4, 4))), cmap="gray", vmin=0, vmax=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="DDPM training steps (batch 128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=toy.ASSETS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    rng = np.random.default_rng(args.seed)
    x, y = toy.load_digits_data()
    split = split_indices(len(x), rng)
    xa, ya, xb, yb = x[split["A"]], y[split["A"]], x[split["B"]], y[split["B"]]
    xt, yt = x[split["test"]], y[split["test"]]

    start = time.perf_counter()
    with torch_global_seed(rng):
        reward_clf = toy.DigitMLP()
    train_classifier(reward_clf, xa, ya, rng, epochs=60, max_noise=0.5, shrink=True)
    with torch_global_seed(rng):
        eval_clf = toy.DigitCNN()
    train_classifier(eval_clf, xb, yb, rng, epochs=60, max_noise=0.15, shrink=False)
    g = torch_generator(rng)
    xt_noisy = (xt + 0.3 * torch.randn(xt.shape, generator=g)).clamp(-1, 1)
    metrics: dict = {
        "split": {"reward_classifier_train": 750, "eval_classifier_train": 750, "test": len(xt), "seed": args.seed},
        "reward_classifier": {"arch": "DigitMLP", "test_accuracy": round(accuracy(reward_clf, xt, yt), 4),
                              "test_accuracy_noise_0.3": round(accuracy(reward_clf, xt_noisy, yt), 4)},
        "eval_classifier": {"arch": "DigitCNN", "test_accuracy": round(accuracy(eval_clf, xt, yt), 4),
                            "test_accuracy_noise_0.3": round(accuracy(eval_clf, xt_noisy, yt), 4)},
    }
    print(f"classifiers trained in {time.perf_counter() - start:.1f} s: {metrics}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(reward_clf.state_dict(), str(args.out / toy.REWARD_CLASSIFIER.name))
    save_file(eval_clf.state_dict(), str(args.out / toy.EVAL_CLASSIFIER.name))

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    with torch_global_seed(rng):
        unet = make_unet()
    start = time.perf_counter()
    ema = train_ddpm(unet, scheduler, x, rng, steps=args.steps)
    metrics["ddpm"] = {"params": sum(p.numel() for p in ema.parameters()), "train_steps": args.steps,
                       "batch": 128, "train_seconds": round(time.perf_counter() - start, 1)}
    ddpm_dir = args.out / toy.DDPM_DIR.name
    ema.save_pretrained(ddpm_dir / "unet")
    scheduler.save_pretrained(ddpm_dir / "scheduler")

    images, quality = sample_quality(ema, scheduler, eval_clf, rng)
    metrics["unsteered_samples"] = quality
    save_grid(images, args.out / "digits_samples.png")
    (args.out / toy.METRICS.name).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

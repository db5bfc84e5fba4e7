"""Bundled toy image diffusion: a tiny DDPM on scikit-learn's 8x8 digits.

Everything here runs offline on a CPU in seconds, so steering methods can be
compared on a real (trained, imperfect) diffusion model with a real reward:

    unet, scheduler = load_digits_ddpm()        # diffusers UNet2DModel + DDPMScheduler
    reward = digit_reward(3)                    # x0 (B, 1, 8, 8) in [-1, 1] -> log p(y=3 | x0)
    judge = load_eval_classifier()              # held-out classifier, for evaluation only
    images = sample_digits(64, rng=np.random.default_rng(0))
    out = steer_digits(3, num_particles=8, seed=0)   # FK steering toward 3: out.particles.x, out.weights

The weights in ``diffusion/assets/`` are trained by ``scripts/train_toy_diffusion.py``
(``make toy-models``):

- ``digits_ddpm/``: a 651k-parameter ``UNet2DModel`` (epsilon prediction) and its
  ``DDPMScheduler(1000, "squaredcos_cap_v2")``, trained on all 1797 digits scaled
  to [-1, 1];
- ``reward_classifier.safetensors``: an MLP trained on one half of the digits with
  Gaussian-noise augmentation, so that its log-probabilities stay sensible on the
  blurry x0 predictions seen early in the reverse process;
- ``eval_classifier.safetensors``: a CNN trained on the other, disjoint half with
  another seed. Steering optimises the first; report the second, so that
  reward hacking of the first classifier does not count as success
  (as FK steering's held-out toxicity classifier, Singhal et al. 2025).

``metrics.json`` records the classifiers' test accuracies and the sample quality.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppl_scaling.result import SMCResult
from ppl_scaling.samplers.fk_steering import fk_steering

from .model import DiffusionModel
from .rewards import ClassifierReward

ASSETS = Path(__file__).resolve().parent / "assets"
DDPM_DIR = ASSETS / "digits_ddpm"
REWARD_CLASSIFIER = ASSETS / "reward_classifier.safetensors"
EVAL_CLASSIFIER = ASSETS / "eval_classifier.safetensors"
METRICS = ASSETS / "metrics.json"
NUM_CLASSES = 10
SAMPLE_SHAPE = (1, 8, 8)


class DigitMLP(nn.Module):
    """Reward classifier: 64 -> 256 -> 256 -> 10 logits, input (B, 1, 8, 8) in [-1, 1]."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitCNN(nn.Module):
    """Evaluation classifier: two 3x3 conv layers, a pooling step and a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: images (1797, 1, 8, 8) scaled to [-1, 1], labels (1797,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(data.target, dtype=torch.long)


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found; train the bundled toy models with `make toy-models` "
                             "(scripts/train_toy_diffusion.py)")


def load_digits_ddpm(path: str | Path = DDPM_DIR) -> tuple[Any, Any]:
    """The bundled digits DDPM: ``(UNet2DModel, DDPMScheduler)``, in eval mode."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(path)
    if not (path / "unet").is_dir():
        raise _missing(path / "unet")
    unet = UNet2DModel.from_pretrained(path / "unet", low_cpu_mem_usage=False).eval()
    unet.requires_grad_(False)
    return unet, DDPMScheduler.from_pretrained(path / "scheduler")


def _load_classifier(module: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise _missing(path)
    module.load_state_dict(load_file(str(path)))
    module.eval()
    module.requires_grad_(False)
    return module


def load_reward_classifier(path: str | Path = REWARD_CLASSIFIER) -> DigitMLP:
    """The classifier that steering optimises (an MLP, trained with noise augmentation)."""
    return _load_classifier(DigitMLP(), Path(path))


def load_eval_classifier(path: str | Path = EVAL_CLASSIFIER) -> DigitCNN:
    """The held-out classifier for evaluation (a CNN, disjoint training data)."""
    return _load_classifier(DigitCNN(), Path(path))


def load_metrics() -> dict:
    """Quality numbers recorded by the training script."""
    return json.loads(METRICS.read_text())


def _check_class(target_class: int) -> int:
    if not isinstance(target_class, (int, np.integer)) or not 0 <= target_class < NUM_CLASSES:
        raise ValueError(f"target_class must be an integer digit 0..9, got {target_class!r}")
    return int(target_class)


def digit_reward(target_class: int, classifier: nn.Module | None = None) -> ClassifierReward:
    """Reward r(x0) = log p(y = target_class | x0) under ``classifier`` (default: the
    bundled reward classifier). Batched: x0 (B, 1, 8, 8) in [-1, 1] -> (B,) float."""
    clf = load_reward_classifier() if classifier is None else classifier
    return ClassifierReward(clf, _check_class(target_class))


def classify(images: torch.Tensor, classifier: nn.Module | None = None) -> torch.Tensor:
    """Class probabilities (B, 10) of ``images`` (default classifier: the held-out one)."""
    clf = load_eval_classifier() if classifier is None else classifier
    with torch.no_grad():
        return torch.softmax(clf(images.float()), dim=-1)


def digits_model(num_inference_steps: int = 50, *, unet: Any = None, scheduler: Any = None,
                 **options: Any) -> DiffusionModel:
    """The bundled DDPM's reverse process as a ``DiffusionModel`` (``options`` go to it)."""
    if unet is None or scheduler is None:
        unet, scheduler = load_digits_ddpm()
    return DiffusionModel(unet, scheduler, SAMPLE_SHAPE, num_inference_steps=num_inference_steps, **options)


def sample_digits(n: int, *, num_inference_steps: int = 50, rng: np.random.Generator,
                  unet: Any = None, scheduler: Any = None) -> torch.Tensor:
    """``n`` unsteered DDPM samples (n, 1, 8, 8) in [-1, 1]: the plain ancestral sampler."""
    model = digits_model(num_inference_steps, unet=unet, scheduler=scheduler)
    return model.sample(n, rng).clamp(-1.0, 1.0)


def steer_digits(target_class: int, num_particles: int, *, lam: float = 1.0, num_inference_steps: int = 25,
                 unet: Any = None, scheduler: Any = None, reward: Any = None, **kwargs: Any) -> SMCResult:
    """FK steering of the bundled DDPM toward ``target_class`` in one call: ``fk_steering`` with
    r = ``digit_reward(target_class)``; ``kwargs`` go to ``fk_steering`` (seed, rng, shape,
    resample_every, ...). With lam = 1 and a calibrated classifier the target
    p(x) p(y = c | x) is the class-conditional p(x | y = c). Samples: ``result.particles.x``."""
    model = digits_model(num_inference_steps, unet=unet, scheduler=scheduler)
    return fk_steering(model, num_particles, potential=digit_reward(target_class) if reward is None else reward,
                       lam=lam, **kwargs)


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """Tile images (B, 1, 8, 8) in [-1, 1] into one grey array in [0, 1] (ink dark on white)."""
    imgs = ((1.0 - images.detach().float().clamp(-1, 1)) / 2.0).squeeze(1).numpy()
    B, h, w = imgs.shape
    ncol = min(nrow, B)
    nrows = -(-B // ncol)
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad))
    for i, img in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return grid

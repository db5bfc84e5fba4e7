"""Reward functions for diffusion steering: a batch of decoded samples -> (N,) log-values.

Each is a plain function of a batch; the methods coerce it to a ``Potential``
(``ppl_scaling.as_potential``), so rewards combine with the potential algebra
(products, tempering) and Pyro potentials.

Built-in, weight-free or user-model based:

    ClassifierReward(classifier, target)   log p(target | x) from any torch classifier (logits)
    jpeg_compressibility(images)           -(JPEG size in kB at quality 95), via PIL (DDPO/SVDD)
    jpeg_incompressibility(images)         +(JPEG size in kB)
    brightness(images)                     mean pixel value (FK-Diffusion-Steering's demo reward)

Images are float tensors (N, C, H, W) in [0, 1] (``to_unit_range`` maps [-1, 1] model
outputs there). Hub-model rewards (CLIP score, ImageReward, LAION aesthetics) need weights
the user provides; their loaders import their packages lazily and say what to install.
"""
from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import torch


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map images from the model range [-1, 1] to [0, 1] (clamped)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value of each image (N, ...) -> (N,)."""
    return images.reshape(images.shape[0], -1).float().mean(dim=1)


def _jpeg_kb(image: torch.Tensor, quality: int) -> float:
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


def jpeg_compressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """-(JPEG file size in kB) of each image in [0, 1], (N, C, H, W) with C = 1 or 3; not differentiable."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"JPEG rewards need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    return torch.tensor([-_jpeg_kb(im, quality) for im in images], dtype=torch.float64)


def jpeg_incompressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kB of each image (the negation of ``jpeg_compressibility``)."""
    return -jpeg_compressibility(images, quality)


class ClassifierReward:
    """r(x) = log p(target | x) = log_softmax(classifier(transform(x)))[target].

    ``classifier`` is any torch callable returning logits (N, classes) (or an object with
    ``.logits``); ``target`` an int class or a (N,) tensor of per-sample classes.
    """

    def __init__(self, classifier: Callable[[torch.Tensor], Any], target: int | torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.classifier = classifier
        self.target = target
        self.transform = transform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        inp = x if self.transform is None else self.transform(x)
        with torch.no_grad():
            out = self.classifier(inp)
        logits = getattr(out, "logits", out)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"classifier must return logits of shape (N, num_classes) for N={x.shape[0]} inputs, "
                             f"got {getattr(logits, 'shape', type(logits).__name__)}")
        logp = torch.log_softmax(logits.double(), dim=1)
        target = torch.as_tensor(self.target, device=logp.device).long().reshape(-1)
        if target.numel() == 1:
            return logp[:, int(target)]
        return logp.gather(1, target[:, None])[:, 0]


def _features(out: Any) -> torch.Tensor:
    """CLIP ``get_*_features`` output: a tensor (transformers 4) or an output whose
    ``pooler_output`` holds the projected features (transformers 5); L2-normalised."""
    f = out if isinstance(out, torch.Tensor) else out.pooler_output
    return f / f.norm(dim=-1, keepdim=True)


def _need(package: str, what: str, install: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{what} needs the '{package}' package: {install}") from e


def clip_score(model_path: str, prompt: str, *, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """CLIP score reward: cosine similarity of image and ``prompt`` embeddings, from a local
    ``transformers`` CLIP checkpoint directory ``model_path`` (e.g. a saved openai/clip-vit-large-patch14)."""
    transformers = _need("transformers", "clip_score", "pip install transformers")
    model = transformers.CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
    processor = transformers.CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    text = processor(text=[prompt], return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        t = _features(model.get_text_features(**text))

    def reward(images: torch.Tensor) -> torch.Tensor:
        pix = processor(images=list(images.float().clamp(0, 1).cpu()), return_tensors="pt", do_rescale=False)
        with torch.no_grad():
            f = _features(model.get_image_features(pixel_values=pix["pixel_values"].to(device)))
        return (f @ t.T)[:, 0]

    return reward


def image_reward(model_path: str, prompt: str, *, med_config: str | None = None,
                 device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """ImageReward (Xu et al. 2023) from a local checkpoint file ``model_path`` (ImageReward.pt);
    needs the ``image-reward`` package (``pip install image-reward``)."""
    RM = _need("ImageReward", "image_reward", "pip install image-reward")
    model = RM.load(model_path, device=device, med_config=med_config)

    def reward(images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        pils = [Image.fromarray((im.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
                for im in images]
        with torch.no_grad():
            scores = model.score(prompt, pils)
        return torch.as_tensor(np.atleast_1d(scores), dtype=torch.float64)

    return reward


def aesthetic_score(clip_model_path: str, head_path: str, *, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """LAION aesthetic predictor: a linear/MLP head (``head_path``, a torch state dict such as
    sac+logos+ava1-l14-linearMSE.pth) on normalised CLIP ViT-L/14 image embeddings from a local
    ``transformers`` checkpoint ``clip_model_path``. The head's layers are read from the state dict."""
    transformers = _need("transformers", "aesthetic_score", "pip install transformers")
    model = transformers.CLIPModel.from_pretrained(clip_model_path, local_files_only=True).to(device).eval()
    processor = transformers.CLIPProcessor.from_pretrained(clip_model_path, local_files_only=True)
    state = torch.load(head_path, map_location=device, weights_only=True)
    weights = [(state[k], state[k[:-len("weight")] + "bias"]) for k in state if k.endswith("weight")]
    if not weights:
        raise ValueError(f"{head_path} holds no '*.weight' tensors; expected the aesthetic head's state dict")

    def reward(images: torch.Tensor) -> torch.Tensor:
        pix = processor(images=list(images.float().clamp(0, 1).cpu()), return_tensors="pt", do_rescale=False)
        with torch.no_grad():
            h = _features(model.get_image_features(pixel_values=pix["pixel_values"].to(device)))
            for W, b in weights:  # the LAION head is a stack of Linear layers (dropouts are inactive)
                h = h @ W.T + b
        return h[:, 0]

    return reward

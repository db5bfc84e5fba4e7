"""Rewards for diffusion steering: potentials over batches of decoded images.

Every reward here is a ``ppl_scaling.Potential`` whose log-value is the reward, log phi(x) = r(x),
so rewards combine with the potential algebra before any method sees them::

    clip * brightness ** 0.5        r(x) = r_clip(x) + 0.5 r_brightness(x)

and calling one, ``reward(images)``, returns its (N,) tensor of rewards (no ledger entry; a
method's ``potential.score`` records ``reward_calls``).

Images are float tensors (N, C, H, W) with C = 1 or 3. An ``ImagePotential`` reads them in its
``value_range``: (0, 1) by default, what the pipelines' VAE decoders produce
(``diffusion.pipelines``); (-1, 1) for the raw samples of a pixel-space DDPM such as the bundled
digits model (``reward.in_range(-1, 1)``, or build the model with ``decode=to_unit_range``).
Values are mapped affinely to [0, 1] and clamped, u = clamp((x - lo) / (hi - lo), 0, 1), before
the reward reads them.

Weight-free::

    brightness(images)                mean pixel value of u (FK-Diffusion-Steering's demo reward)
    jpeg_compressibility(images)      -(JPEG size of u in kB at quality 95), via PIL (DDPO / SVDD)
    jpeg_incompressibility(images)    +(JPEG size in kB)
    ClassifierReward(classifier, c)   log p(c | x) from any torch classifier's logits (reads x as given)

Hub models, one interface ``load_reward(name, path, **options)``: local weights the user provides
(no download), packages imported lazily, errors that say what is missing and what to install::

    name            reward r(x)                                      weights at ``path``
    "clip"          cos(f_img(x), f_txt(prompt))                     transformers CLIPModel directory
    "pickscore"     exp(logit_scale) cos(f_img, f_txt)               CLIPModel directory (PickScore_v1)
    "hpsv2"         cos(f_img, f_txt) (HPSv2: a fine-tuned CLIP)     CLIPModel directory (converted HPSv2)
    "aesthetic"     MLP head on the normalised CLIP image embedding  CLIP directory + ``head_path`` (.pth)
    "image_reward"  ImageReward's score (BLIP + MLP, its own code)   ImageReward.pt, package image-reward

CLIP-based rewards preprocess as their checkpoints' ``CLIPImageProcessor`` says: grey images
repeated to RGB, 8-bit storage as PIL does, resize of the shortest edge, centre crop, normalisation
by the processor's mean and std; f_img, f_txt are the projected, L2-normalised CLIP features.
HPSv2's released file (HPS_v2_compressed.pt) is an OpenCLIP ViT-H-14 state dict, which transformers
cannot read: convert it to a CLIPModel directory first, or score with the ``hpsv2`` package.
"""
from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_scaling.potentials import Potential

__all__ = ["ImagePotential", "ClassifierReward", "CLIPFeatures", "to_unit_range", "brightness", "jpeg_compressibility",
           "jpeg_incompressibility", "clip_score", "pickscore", "hpsv2", "aesthetic_score", "image_reward",
           "load_reward", "LOADERS"]

ValueRange = tuple[float, float]


def to_unit_range(x: torch.Tensor, value_range: ValueRange = (-1.0, 1.0)) -> torch.Tensor:
    """Map images from ``value_range`` (lo, hi) (default: the model range [-1, 1]) to [0, 1]:
    clamp((x - lo) / (hi - lo), 0, 1)."""
    lo, hi = value_range
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def _check_range(value_range: Sequence[float]) -> ValueRange:
    lo, hi = (float(v) for v in value_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite (lo, hi) with lo < hi, got {tuple(value_range)}")
    return lo, hi


class ImagePotential(Potential):
    """A reward r over batches of images (N, C, H, W) as a potential, log phi = r: ``fn`` reads
    images in [0, 1]; inputs in ``value_range`` are mapped there (module docstring).
    ``potential(images, *args)`` returns fn's (N,) tensor; ``prefix`` = ``complete`` = it."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, name: str,
                 value_range: Sequence[float] = (0.0, 1.0)) -> None:
        self.fn, self.name, self.value_range = fn, name, _check_range(value_range)

    def __call__(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"{self.name} reads a batch of images, a tensor (N, C, H, W); got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        return self.fn(to_unit_range(images.float(), self.value_range), *args, **kwargs)

    def prefix(self, xs: torch.Tensor) -> torch.Tensor:
        return self(xs)

    def in_range(self, lo: float, hi: float) -> ImagePotential:
        """The same reward reading images with values in [lo, hi]."""
        return ImagePotential(self.fn, name=self.name, value_range=(lo, hi))


# --- weight-free rewards ---------------------------------------------------------------

def _brightness(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).mean(dim=1)


def _jpeg_kb(image: torch.Tensor, quality: int) -> float:
    from PIL import Image

    arr = (image.detach() * 255).round().to(torch.uint8).cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


def _jpeg_sizes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    if images.shape[1] not in (1, 3):
        raise ValueError(f"JPEG rewards need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    return torch.tensor([_jpeg_kb(im, quality) for im in images], dtype=torch.float64)


def _jpeg_compressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    return -_jpeg_sizes(images, quality)


brightness = ImagePotential(_brightness, name="brightness")
jpeg_compressibility = ImagePotential(_jpeg_compressibility, name="jpeg_compressibility")
jpeg_incompressibility = ImagePotential(_jpeg_sizes, name="jpeg_incompressibility")


class ClassifierReward(Potential):
    """r(x) = log p(target | x) = log_softmax(classifier(transform(x)))[target], as a potential.

    ``classifier`` is any torch callable returning logits (N, classes) (or an object with
    ``.logits``); ``target`` an int class or a (N,) tensor of per-sample classes. It reads x as
    given (no range mapping: ``transform`` prepares what the classifier expects).
    """

    name = "ClassifierReward"

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

    def prefix(self, xs: torch.Tensor) -> torch.Tensor:
        return self(xs)


# --- hub-model rewards -----------------------------------------------------------------

def _need(package: str, what: str, install: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{what} needs the '{package}' package: {install}") from e


def _checkpoint_dir(path: str | Path, what: str, example: str) -> Path:
    """``path`` as a local transformers checkpoint directory (config.json and preprocessor_config.json)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no checkpoint at {p}; download {example} and pass its local directory "
                                "(nothing is downloaded here)")
    if not p.is_dir():
        raise ValueError(f"{what}: {p} is a file; pass the directory of a transformers CLIP checkpoint "
                         f"(config.json, weights, preprocessor_config.json), e.g. a saved {example}")
    for name in ("config.json", "preprocessor_config.json"):
        if not (p / name).is_file():
            hint = ("save the CLIPProcessor of the base CLIP model there (processor.save_pretrained)"
                    if name.startswith("pre") else "it is not a transformers checkpoint")
            raise FileNotFoundError(f"{what}: {p} has no {name}; {hint}")
    return p


def _features(out: Any) -> torch.Tensor:
    """CLIP ``get_*_features`` output (a tensor in transformers 4, an output whose
    ``pooler_output`` holds the projected features in transformers 5), L2-normalised."""
    f = out if isinstance(out, torch.Tensor) else out.pooler_output
    return f / f.norm(dim=-1, keepdim=True)


class CLIPFeatures:
    """Projected, L2-normalised CLIP image and text features from a local transformers checkpoint
    (a ``CLIPModel``, or a ``CLIPVisionModelWithProjection`` for image features only), with its
    image processor and tokenizer. ``image(u)``: u (N, 1 or 3, H, W) in [0, 1]."""

    def __init__(self, path: str | Path, what: str, example: str, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, text: bool = True) -> None:
        transformers = _need("transformers", what, "pip install transformers")
        path = _checkpoint_dir(path, what, example)
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "clip_vision_model" and not text:
            cls = transformers.CLIPVisionModelWithProjection
        elif config.model_type == "clip":
            cls = transformers.CLIPModel
        else:
            raise ValueError(f"{what}: {path} holds a {config.model_type!r} model; expected a CLIP checkpoint "
                             f"({'CLIPModel' if text else 'CLIPModel or CLIPVisionModelWithProjection'})")
        self.device, self.dtype = torch.device(device), dtype
        self.model = cls.from_pretrained(path, local_files_only=True, dtype=dtype).to(self.device).eval()
        self.processor = transformers.CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) if text else None

    def image(self, u: torch.Tensor) -> torch.Tensor:
        rgb = u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u
        pix = self.processor(images=list(rgb.cpu()), return_tensors="pt", do_rescale=False)["pixel_values"]
        pix = pix.to(self.device, self.dtype)
        with torch.no_grad():
            if hasattr(self.model, "get_image_features"):
                return _features(self.model.get_image_features(pixel_values=pix))
            return _features(self.model(pixel_values=pix).image_embeds)

    def text(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be one string, got {type(prompt).__name__}")
        tok = self.tokenizer([prompt], return_tensors="pt", padding=True, truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings)
        with torch.no_grad():
            return _features(self.model.get_text_features(**tok.to(self.device)))


def _similarity(path: str | Path, prompt: str, *, name: str, example: str, scale: bool,
                device: str | torch.device, dtype: torch.dtype, value_range: Sequence[float]) -> ImagePotential:
    clip = CLIPFeatures(path, name, example, device=device, dtype=dtype)
    t = clip.text(prompt)
    s = clip.model.logit_scale.exp().detach() if scale else 1.0

    def reward(u: torch.Tensor) -> torch.Tensor:
        return s * (clip.image(u) @ t.T)[:, 0]

    return ImagePotential(reward, name=f"{name}({prompt!r})", value_range=value_range)


def clip_score(path: str | Path, prompt: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               value_range: Sequence[float] = (0.0, 1.0)) -> ImagePotential:
    """CLIP score: r(x) = cos(f_img(x), f_txt(prompt)), from a local CLIPModel directory ``path``
    (e.g. a saved openai/clip-vit-large-patch14)."""
    return _similarity(path, prompt, name="clip_score", example="openai/clip-vit-large-patch14", scale=False,
                       device=device, dtype=dtype, value_range=value_range)


def pickscore(path: str | Path, prompt: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              value_range: Sequence[float] = (0.0, 1.0)) -> ImagePotential:
    """PickScore (Kirstain et al. 2023): r(x) = exp(logit_scale) cos(f_img(x), f_txt(prompt)) of the
    fine-tuned CLIP-H in ``path`` (yuvalkirstain/PickScore_v1 with the processor of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K saved beside it)."""
    return _similarity(path, prompt, name="pickscore", example="yuvalkirstain/PickScore_v1", scale=True,
                       device=device, dtype=dtype, value_range=value_range)


def hpsv2(path: str | Path, prompt: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          value_range: Sequence[float] = (0.0, 1.0)) -> ImagePotential:
    """HPSv2 (Wu et al. 2023): r(x) = cos(f_img(x), f_txt(prompt)) of the HPSv2 CLIP ViT-H-14, from a
    transformers CLIPModel directory holding its converted weights. The released OpenCLIP file
    is refused with what to do (module docstring)."""
    p = Path(path)
    if p.is_file():
        raise ValueError(f"hpsv2: {p} is a file, presumably the released OpenCLIP checkpoint (HPS_v2_compressed.pt), "
                         "which transformers cannot load. Convert its ViT-H-14 weights to a transformers CLIPModel "
                         "directory and pass that, or score with the 'hpsv2' package (pip install hpsv2, which "
                         "needs open-clip-torch)")
    return _similarity(path, prompt, name="hpsv2", example="the HPSv2 ViT-H-14 converted to transformers", scale=False,
                       device=device, dtype=dtype, value_range=value_range)


def aesthetic_score(path: str | Path, head_path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, value_range: Sequence[float] = (0.0, 1.0)) -> ImagePotential:
    """LAION aesthetic predictor: r(x) = head(f_img(x)), a stack of Linear layers (``head_path``: a
    torch state dict such as sac+logos+ava1-l14-linearMSE.pth; its dropouts are inactive and it has
    no activations) on the normalised image embedding of the CLIP ViT-L/14 in ``path`` (CLIPModel or
    CLIPVisionModelWithProjection directory). The head's layers are read from the state dict."""
    if not Path(head_path).is_file():
        raise FileNotFoundError(f"aesthetic_score: no head weights at {head_path}; download the LAION aesthetic "
                                "predictor's state dict (e.g. sac+logos+ava1-l14-linearMSE.pth)")
    clip = CLIPFeatures(path, "aesthetic_score", "openai/clip-vit-large-patch14", device=device, dtype=dtype,
                        text=False)
    state = torch.load(head_path, map_location=clip.device, weights_only=True)
    layers = [(state[k].to(dtype), state[k[:-len("weight")] + "bias"].to(dtype)) for k in state if k.endswith("weight")]
    if not layers:
        raise ValueError(f"{head_path} holds no '*.weight' tensors; expected the aesthetic head's state dict")

    def reward(u: torch.Tensor) -> torch.Tensor:
        h = clip.image(u)
        for W, b in layers:
            h = h @ W.T + b
        return h[:, 0]

    return ImagePotential(reward, name="aesthetic_score", value_range=value_range)


def image_reward(path: str | Path, prompt: str, *, med_config: str | None = None, device: str | torch.device = "cpu",
                 value_range: Sequence[float] = (0.0, 1.0)) -> ImagePotential:
    """ImageReward (Xu et al. 2023), a BLIP image-text encoder with an MLP head, through its own
    package (``pip install image-reward``) from a local checkpoint file ``path`` (ImageReward.pt;
    ``med_config``: its med_config.json). Scores the images as PIL images (its preprocessing); float32."""
    RM = _need("ImageReward", "image_reward", "pip install image-reward")
    if not Path(path).is_file():
        raise FileNotFoundError(f"image_reward: no checkpoint file at {path}; download ImageReward.pt "
                                "(THUDM/ImageReward) and pass its local path")
    model = RM.load(str(path), device=str(device), med_config=med_config)

    def reward(u: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        rgb = u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u
        pils = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).cpu().numpy()) for im in rgb]
        with torch.no_grad():
            scores = model.score(prompt, pils)
        return torch.as_tensor(np.atleast_1d(scores), dtype=torch.float64)

    return ImagePotential(reward, name=f"image_reward({prompt!r})", value_range=value_range)


LOADERS: dict[str, Callable[..., ImagePotential]] = {
    "clip": clip_score, "pickscore": pickscore, "hpsv2": hpsv2, "aesthetic": aesthetic_score,
    "image_reward": image_reward,
}


def load_reward(name: str, path: str | Path, *args: Any, **options: Any) -> ImagePotential:
    """The hub-model reward ``name`` (a key of ``LOADERS``) from local weights at ``path``:
    ``LOADERS[name](path, *args, **options)``, e.g. ``load_reward("pickscore", d, prompt="a cat",
    device="cuda", dtype=torch.float16)`` or ``load_reward("aesthetic", d, head_path=h)``."""
    if name not in LOADERS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(LOADERS)}")
    return LOADERS[name](path, *args, **options)

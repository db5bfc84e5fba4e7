"""Hub-model image rewards as potentials (diffusion/rewards.py), on tiny random CLIP models built
from configs offline and loaded by path: values, preprocessing, the potential algebra, steering
the bundled digits DDPM, and the errors."""
import json
import sys

import numpy as np
import pytest
import torch

from ppl_scaling.diffusion import rewards
from ppl_scaling.diffusion.toy import digits_model
from ppl_scaling.potentials import Potential, check_potential
from ppl_scaling.samplers.fk_steering import fk_steering

SIZE = 16  # the tiny CLIP's image size
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def write_tokenizer(folder):
    """A CLIPTokenizer from a vocab and merges written here: letters (with their end-of-word forms)
    and two merges, so that "cat" is one token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    merges = [("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    assert tok("a cat")["input_ids"] == [0, 3, vocab["cat</w>"], 1]
    return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Saved checkpoints: a tiny CLIPModel (+ tokenizer and image processor), a tiny
    CLIPVisionModelWithProjection (+ image processor) and an aesthetic head."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    root = tmp_path_factory.mktemp("clip")
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=SIZE, patch_size=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                  num_hidden_layers=1)
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
        with torch.no_grad():
            clip.logit_scale.fill_(np.log(50.0))
        vis = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision, projection_dim=8)).eval()
        head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 1)).eval()
    clip.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    write_tokenizer(root).save_pretrained(root / "clip")
    vis.save_pretrained(root / "vision")
    processor.save_pretrained(root / "vision")
    torch.save(head.state_dict(), root / "head.pth")
    return {"root": root, "clip": clip, "vision": vis, "head": head}


def unit_images(n=3, size=SIZE, channels=3, seed=0):
    return torch.rand((n, channels, size, size), generator=torch.Generator().manual_seed(seed))


def normed(f):
    f = getattr(f, "pooler_output", f)
    return f / f.norm(dim=-1, keepdim=True)


def pixels(u):
    """The CLIP processor by hand for SIZE x SIZE inputs in [0, 1] (resize and crop keep them): 8-bit
    quantisation as PIL stores images (floor(255 u) / 255), then (v - mean) / std."""
    return ((torch.floor(u.double() * 255) / 255 - MEAN.double()) / STD.double()).float()


def manual_image_features(model, u):
    with torch.no_grad():
        return normed(model.get_image_features(pixel_values=pixels(u)))


def manual_text_features(model, tokens):
    with torch.no_grad():
        return normed(model.get_text_features(input_ids=torch.tensor([tokens])))


def test_clip_pickscore_hpsv2_values_and_contract(ckpt):
    d, model, u = ckpt["root"] / "clip", ckpt["clip"], unit_images()
    cat = [0, 3, 55, 1]  # "a cat" with the merges above
    cos = (manual_image_features(model, u) @ manual_text_features(model, cat).T)[:, 0]
    clip = rewards.load_reward("clip", d, prompt="a cat")
    pick = rewards.load_reward("pickscore", d, prompt="a cat")
    hps = rewards.hpsv2(str(d), "a cat")
    for p in (clip, pick, hps):
        assert isinstance(p, Potential) and p(u).shape == (3,)
        torch.testing.assert_close(p(u), p(u))  # deterministic
        check_potential(p, u, atol=1e-5)  # batch-independent, order-free, prefix = complete
    torch.testing.assert_close(clip(u), cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hps(u), cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pick(u), 50.0 * cos, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(pick.score(u), 50.0 * cos.double().numpy(), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(clip(u), rewards.clip_score(d, "a red dog")(u))  # the prompt matters


def test_aesthetic_head_on_clip_model_or_vision_model(ckpt):
    u, head = unit_images(seed=1), ckpt["head"]
    with torch.no_grad():
        expect = head(manual_image_features(ckpt["clip"], u))[:, 0]
        vis = normed(ckpt["vision"](pixel_values=pixels(u)).image_embeds)
    a = rewards.load_reward("aesthetic", ckpt["root"] / "clip", head_path=ckpt["root"] / "head.pth")
    torch.testing.assert_close(a(u), expect, atol=1e-5, rtol=1e-5)
    b = rewards.aesthetic_score(ckpt["root"] / "vision", ckpt["root"] / "head.pth")
    torch.testing.assert_close(b(u), head(vis)[:, 0].detach(), atol=1e-5, rtol=1e-5)


def test_preprocessing_ranges_grey_images_and_resizing(ckpt):
    clip = rewards.clip_score(ckpt["root"] / "clip", "a cat")
    u = unit_images(seed=2)
    signed = clip.in_range(-1.0, 1.0)
    torch.testing.assert_close(signed(2 * u - 1), clip(u), atol=1e-5, rtol=1e-5)  # [-1, 1] read as [0, 1]
    over = u.clone()
    over[:, :, :4] = 1.7  # out-of-range values are clamped, as when saving an image
    torch.testing.assert_close(clip(over), clip(over.clamp(0, 1)))
    grey = u[:, :1]
    torch.testing.assert_close(clip(grey), clip(grey.expand(-1, 3, -1, -1)))  # one channel -> RGB
    spy = []
    features = rewards.CLIPFeatures(ckpt["root"] / "clip", "clip_score", "a CLIP")
    handle = features.model.vision_model.register_forward_pre_hook(
        lambda m, a, kw: spy.append(tuple(kw["pixel_values"].shape)), with_kwargs=True)
    features.image(unit_images(2, size=40, seed=3)[:, :, :24])  # 24 x 40 -> shortest edge 16, centre crop 16 x 16
    features.image(unit_images(2, size=8, seed=4))  # 8 x 8 digits are upsampled
    handle.remove()
    assert spy == [(2, 3, SIZE, SIZE), (2, 3, SIZE, SIZE)]
    with pytest.raises(ValueError, match=r"tensor \(N, C, H, W\)"):
        clip(u[0])
    with pytest.raises(ValueError, match="lo < hi"):
        clip.in_range(1.0, -1.0)


def test_products_and_tempering_steer_the_digits_ddpm(ckpt):
    """clip_reward * brightness ** 0.5 is a potential over the DDPM's raw samples in [-1, 1]."""
    clip = rewards.clip_score(ckpt["root"] / "clip", "a cat", value_range=(-1, 1))
    combined = clip * rewards.brightness.in_range(-1, 1) ** 0.5
    N, K = 4, 3
    out = fk_steering(digits_model(K), N, potential=combined, lam=5.0, ess_threshold=1.0, seed=0)
    assert out.particles.x.shape == (N, 1, 8, 8)
    assert (out.ledger.nfe, out.ledger.reward_calls) == (N * K, N * (K + 1))
    x = out.particles.x
    expect = clip(x).double() + 0.5 * ((x + 1) / 2).clamp(0, 1).reshape(N, -1).mean(1).double()
    np.testing.assert_allclose(combined.score(x), expect.numpy(), rtol=1e-5, atol=1e-6)
    assert out.resampled[1:].all() and np.isfinite(out.log_weights).all()


def test_weight_free_rewards_are_potentials():
    u = unit_images(seed=5)
    for p in (rewards.brightness, rewards.jpeg_compressibility, rewards.jpeg_incompressibility,
              rewards.ClassifierReward(lambda x: x.reshape(x.shape[0], -1)[:, :4], target=2)):
        assert isinstance(p, Potential)
        check_potential(p, u)
    np.testing.assert_allclose((rewards.brightness ** 2).score(u), 2 * u.reshape(3, -1).mean(1).numpy(), rtol=1e-6)
    torch.testing.assert_close(rewards.jpeg_compressibility(u, 50), -rewards.jpeg_incompressibility(u, 50))


def test_errors_name_what_is_missing(ckpt, tmp_path, monkeypatch):
    root = ckpt["root"]
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing is downloaded"):
        rewards.load_reward("pickscore", tmp_path / "absent", prompt="a cat")
    with pytest.raises(ValueError, match="is a file; pass the directory"):
        rewards.clip_score(root / "head.pth", "a cat")
    (tmp_path / "noproc").mkdir()
    (tmp_path / "noproc" / "config.json").write_text((root / "clip" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json; save the CLIPProcessor"):
        rewards.clip_score(tmp_path / "noproc", "a cat")
    with pytest.raises(ValueError, match="expected a CLIP checkpoint"):  # a vision tower cannot score text
        rewards.pickscore(root / "vision", "a cat")
    with pytest.raises(ValueError, match=r"OpenCLIP checkpoint .*pip install hpsv2"):
        rewards.hpsv2(root / "head.pth", "a cat")
    with pytest.raises(FileNotFoundError, match="no head weights"):
        rewards.aesthetic_score(root / "clip", tmp_path / "head.pth")
    with pytest.raises(ImportError, match="pip install image-reward"):
        rewards.load_reward("image_reward", tmp_path / "ImageReward.pt", prompt="a cat")
    with pytest.raises(ValueError, match="unknown reward 'imagereward'; choose one of"):
        rewards.load_reward("imagereward", root)
    with pytest.raises(TypeError, match="one string"):
        rewards.clip_score(root / "clip", ["a cat", "a dog"])
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="clip_score needs the 'transformers' package: pip install transformers"):
        rewards.clip_score(root / "clip", "a cat")

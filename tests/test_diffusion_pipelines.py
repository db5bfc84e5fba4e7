"""FK steering of a tiny, randomly initialised StableDiffusionPipeline built offline."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from diffusion_fixtures import tiny_random_pipeline
from ppl_scaling.diffusion.pipelines import steer_stable_diffusion, stochastic_scheduler
from ppl_scaling.diffusion.rewards import brightness


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(seed=0)


def test_shapes_rewards_and_compute(pipe):
    seen = []

    def reward(images):
        seen.append(images)
        return brightness(images)

    out = steer_stable_diffusion(pipe, "a red cat", reward, num_particles=3, lam=20.0, num_inference_steps=4,
                                 guidance_scale=3.0, ess_threshold=1.0, seed=0)
    assert out.info["images"].shape == (3, 3, 16, 16) and out.particles.x.shape == (3, 4, 8, 8)
    assert all(im.shape == (3, 3, 16, 16) and im.min() >= 0 and im.max() <= 1 for im in seen)
    assert out.ledger.nfe == 3 * 4 and out.ledger.reward_calls == 3 * 5
    np.testing.assert_allclose(out.rewards, brightness(out.info["images"]).numpy(), rtol=1e-5)
    assert out.resampled[1:].all()


def test_determinism_per_seed(pipe):
    kw = dict(num_particles=2, lam=5.0, num_inference_steps=3, guidance_scale=2.0, seed=11)
    a = steer_stable_diffusion(pipe, "a cat", brightness, **kw)
    b = steer_stable_diffusion(pipe, "a cat", brightness, **kw)
    assert torch.equal(a.info["images"], b.info["images"]) and np.array_equal(a.log_weights, b.log_weights)
    c = steer_stable_diffusion(pipe, "a cat", brightness, **{**kw, "seed": 12})
    assert not torch.equal(a.particles.x, c.particles.x)


def test_latents_and_conditioning_resampled_together(pipe):
    """One prompt per particle: after resampling at every step each particle still carries the
    prompt embedding of its step-0 ancestor, and the UNet always saw the rows of the state."""
    prompts = ["a cat", "a dog", "a red car", "the sea"]
    calls = []
    unet = pipe.unet
    original = unet.forward

    def spy(sample, t, encoder_hidden_states=None, **kw):
        calls.append(encoder_hidden_states.clone())
        return original(sample, t, encoder_hidden_states=encoder_hidden_states, **kw)

    unet.forward = spy
    try:
        out = steer_stable_diffusion(pipe, prompts, brightness, num_particles=4, lam=200.0, num_inference_steps=5,
                                     guidance_scale=1.0, ess_threshold=1.0, seed=0, store_history=True)
    finally:
        del unet.forward
    first = out.history[0].cond["prompt_embeds"]
    assert torch.unique(first.flatten(1), dim=0).shape[0] == 4  # four distinct prompts
    origin = out.lineage()[0]
    assert len(set(origin.tolist())) < 4  # selection happened
    torch.testing.assert_close(out.particles.cond["prompt_embeds"], first[origin])
    for t, emb in enumerate(calls):  # the UNet call at level t used the conditioning of the state at step t
        torch.testing.assert_close(emb, out.history[t].cond["prompt_embeds"])


def test_scheduler_adapter_and_no_guidance(pipe):
    assert isinstance(stochastic_scheduler(PNDMScheduler()), DDIMScheduler)
    out = steer_stable_diffusion(pipe, "a cat", brightness, num_particles=2, num_inference_steps=2,
                                 guidance_scale=1.0, seed=0)
    assert out.info["images"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="one prompt or one per particle"):
        steer_stable_diffusion(pipe, ["a", "b"], brightness, num_particles=3, num_inference_steps=2, seed=0)


def test_clip_score_and_aesthetic_loaders_with_local_weights(pipe, tmp_path):
    """The lazy loaders read user-provided local checkpoints (here a tiny random CLIP saved offline)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ppl_scaling.diffusion import rewards

    text = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                  num_hidden_layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
        head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 1)).eval()
    model.save_pretrained(tmp_path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=pipe.tokenizer)
    processor.save_pretrained(tmp_path)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    images = torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(0))

    def feats(out):
        f = getattr(out, "pooler_output", out)
        return f / f.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        pix = processor(images=list(images), return_tensors="pt", do_rescale=False)["pixel_values"]
        img = feats(model.get_image_features(pixel_values=pix))
        txt = feats(model.get_text_features(**processor(text=["a cat"], return_tensors="pt", padding=True)))
        torch.testing.assert_close(rewards.clip_score(str(tmp_path), "a cat")(images), (img @ txt.T)[:, 0])
        torch.testing.assert_close(rewards.aesthetic_score(str(tmp_path), str(tmp_path / "head.pth"))(images),
                                   head(img)[:, 0])

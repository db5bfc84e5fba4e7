"""The bundled digits DDPM and classifiers: they load, the DDPM draws digits the held-out
classifier recognises, and FK steering toward a class raises the held-out accuracy."""
import math
from pathlib import Path

import numpy as np
import pytest

from ppl_scaling.diffusion import toy

STEPS = 20


@pytest.fixture(scope="module")
def ddpm():
    return toy.load_digits_ddpm()


@pytest.fixture(scope="module")
def judge():
    return toy.load_eval_classifier()


def test_assets_load_and_classifiers_are_accurate(ddpm, judge):
    unet, scheduler = ddpm
    assert unet.config.sample_size == 8 and scheduler.config.num_train_timesteps == 1000
    metrics = toy.load_metrics()
    assert metrics["reward_classifier"]["test_accuracy"] > 0.95
    assert metrics["eval_classifier"]["test_accuracy"] > 0.95
    x, y = toy.load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1.0 and x.max() == 1.0
    for clf in (toy.load_reward_classifier(), judge):
        assert (toy.classify(x, clf).argmax(-1) == y).float().mean() > 0.95
    r = toy.digit_reward(3)(x[:5])
    assert r.shape == (5,) and (r <= 0).all()


def test_ddpm_draws_recognisable_digits(ddpm, judge):
    unet, scheduler = ddpm
    images = toy.sample_digits(64, num_inference_steps=STEPS, rng=np.random.default_rng(0),
                               unet=unet, scheduler=scheduler)
    probs = toy.classify(images, judge)
    assert images.shape == (64, 1, 8, 8)
    assert probs.max(-1).values.mean() > 0.8
    assert len(set(probs.argmax(-1).tolist())) >= 8


def test_fk_steering_raises_heldout_accuracy(ddpm, judge):
    """One weighted draw per independent FK run (N = 8 particles) is classified as the target
    by the held-out classifier far more often than an unsteered sample."""
    unet, scheduler = ddpm
    target, N, runs = 4, 8, 12
    rng = np.random.default_rng(1)
    base = toy.sample_digits(N * runs, num_inference_steps=STEPS, rng=rng, unet=unet, scheduler=scheduler)
    p_base = float((toy.classify(base, judge).argmax(-1) == target).float().mean())
    reward = toy.digit_reward(target)
    hits = 0
    for _ in range(runs):
        out = toy.steer_digits(target, N, lam=1.0, num_inference_steps=STEPS, unet=unet, scheduler=scheduler,
                               reward=reward, rng=rng)
        draw = out.particles.x[rng.choice(N, p=out.weights)][None]
        hits += int(toy.classify(draw, judge).argmax(-1)[0] == target)
        assert out.ledger.nfe == N * STEPS
    p_fk = hits / runs
    se = math.hypot(math.sqrt(max(p_base * (1 - p_base), 0.05) / (N * runs)),
                    math.sqrt(max(p_fk * (1 - p_fk), 0.05) / runs))
    assert p_fk - p_base > 4 * se, (p_base, p_fk, se)


def test_image_demo_writes_plots(tmp_path):
    from ppl_scaling.diffusion.demo import METHODS, run_image_demo

    out = run_image_demo(tmp_path)
    for key in ("grid", "plot"):
        assert Path(out[key]).parent == tmp_path and Path(out[key]).stat().st_size > 1000
    for method in METHODS:
        assert len(out[method]["reward"]) == len(out["particles"]) == len(out[method]["heldout_accuracy"])

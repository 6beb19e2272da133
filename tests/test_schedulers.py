"""Samplers on the tiny SDXL: step windows counted by the scheduler's timesteps (two U-Net calls
per step for a second-order sampler), and a sampler's own noise drawn from each scene's seed."""
import numpy as np
import pytest
import torch
from diffusers import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler)

from osa_lib.generation import METHODS, generate_story
from osa_lib.isolation import IsolationConfig
from osa_lib.story import parse_story

STEPS = 3
SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler-ancestral": EulerAncestralDiscreteScheduler,
              "heun": HeunDiscreteScheduler, "kdpm2-ancestral": KDPM2AncestralDiscreteScheduler}


@pytest.fixture(params=list(SCHEDULERS))
def sampler(request, tiny, monkeypatch):
    """The tiny SDXL with another scheduler (same noise schedule), restored afterwards."""
    monkeypatch.setattr(tiny.pipe, "scheduler", SCHEDULERS[request.param].from_config(tiny.pipe.scheduler.config))
    return request.param


@pytest.fixture(scope="module")
def story(two_characters):
    return parse_story(two_characters, "scheduler-test")


def unet_calls_of(tiny, run) -> int:
    calls = []
    hook = tiny.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        hook.remove()
    return len(calls)


def test_unet_calls_are_the_schedulers_timesteps(tiny, sampler):
    expected = {"euler": STEPS, "euler-ancestral": STEPS, "heun": 2 * STEPS - 1, "kdpm2-ancestral": 2 * STEPS - 1}
    assert tiny.unet_calls(STEPS) == len(tiny.timesteps(STEPS)) == expected[sampler]
    made = unet_calls_of(tiny, lambda: tiny.generate(["a girl in the park"], [1], num_inference_steps=STEPS,
                                                     progress=False))
    assert made == expected[sampler]


def test_every_method_is_deterministic_whatever_the_global_rng(tiny, story, sampler):
    """Ancestral samplers draw noise at every step: from each scene's seeded generator, not torch's
    global RNG, so the same seeds give the same images after any other use of the RNG."""
    for method in METHODS:
        torch.manual_seed(1)
        first = generate_story(tiny, story, method, num_inference_steps=STEPS, progress=False).images
        torch.manual_seed(2)
        torch.rand(7)
        again = generate_story(tiny, story, method, num_inference_steps=STEPS, progress=False).images
        for a, b in zip(first, again):
            assert np.array_equal(a, b), (sampler, method)


def test_ancestral_noise_follows_the_scene_seed(tiny, monkeypatch):
    """The noise an ancestral sampler adds is drawn (it changes the image) and is each image's own:
    an image drawn in a batch equals the same seed drawn alone."""
    prompts, kwargs = ["a girl in the park", "a boy on the beach"], dict(num_inference_steps=STEPS, progress=False)
    euler = tiny.generate(prompts[:1], [5], **kwargs)[0]
    monkeypatch.setattr(tiny.pipe, "scheduler", EulerAncestralDiscreteScheduler.from_config(tiny.pipe.scheduler.config))
    batch = tiny.generate(prompts, [5, 6], **kwargs)
    alone = tiny.generate(prompts[:1], [5], **kwargs)[0]
    assert np.abs(batch[0] - euler).max() > 1e-3
    assert np.allclose(batch[0], alone, atol=1e-5)
    with pytest.raises(ValueError, match="1 generators for 2 images; give one per image"):
        tiny.denoise(tiny.encode(prompts), tiny.initial_latents([5, 6]), generator=[torch.Generator()], **kwargs)


def test_second_order_windows_cover_all_of_sampling(tiny, story, monkeypatch):
    """Heun makes 2·3 − 1 = 5 U-Net calls for 3 steps: warm-up is 20 % of them (1 call), and the
    bank stores every 3rd call after it (calls 1 and 4), up to the last one."""
    monkeypatch.setattr(tiny.pipe, "scheduler", HeunDiscreteScheduler.from_config(tiny.pipe.scheduler.config))
    config = IsolationConfig(warmup=0.2, bank_step_stride=3)
    result = generate_story(tiny, story, "isolated", config=config, num_inference_steps=STEPS, progress=False)
    steps = {step for entries in result.bank.tokens.values() for _, step in entries}
    assert steps == {1, 4}
    assert result.bank.drawn["scheduler"]["name"] == "HeunDiscreteScheduler"
    assert len(result.bank.drawn["scheduler"]["timesteps"]) == 5

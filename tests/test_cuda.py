"""On a CUDA device (skipped without one): every method generates a two-character story on the
toy and on ``sdxl-tiny``; λ = 0 reproduces vanilla exactly; no isolated attention layer call
synchronises with the host (``torch.cuda.set_sync_debug_mode("error")`` inside each call);
vanilla equals the stock pipeline in fp16; ``cpu_offload`` gives the same image; the reference
bank stays on the GPU while generating, and a bank loaded on the CPU gives the same scenes; CSA's
bank goes to the host under ``cpu_offload`` (same images; peak memory within 2 GB of isolated
attention's on full-size SDXL at 1024²); an ancestral sampler is deterministic; characters are
located as on the CPU.

Runs under pytest, or as ``python tests/test_cuda.py`` where pytest is not installed.
"""
from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from osa_lib import IsolationConfig, load_backbone
from osa_lib.bank import ReferenceBank
from osa_lib.isolation import IsolatedCrossAttention, IsolatedSelfAttention
from osa_lib.generation import METHODS, generate_story
from osa_lib.story import parse_story

try:
    import pytest
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
except ImportError:  # plain-script run
    pytest = None

STEPS = 5
STORIES = {
    "toy": {"characters": [{"name": "Rosa", "word": "circle", "id_prompt": "a red circle"},
                           {"name": "Tom", "word": "square", "id_prompt": "a blue square"}],
            "scenes": [{"prompt": "a red circle in the meadow", "characters": ["Rosa"], "seed": 1},
                       {"prompt": "a blue square in the snow", "characters": ["Tom"], "seed": 2},
                       {"prompt": "a red circle and a blue square in the meadow", "characters": ["Rosa", "Tom"],
                        "seed": 3}]},
    "sdxl-tiny": {"characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair"},
                                 {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
                  "scenes": [{"prompt": "a girl in the park", "characters": ["Lily"], "seed": 1},
                             {"prompt": "a boy on the beach", "characters": ["Tom"], "seed": 2},
                             {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 3}]},
}


@functools.lru_cache(maxsize=None)
def backbone(name: str, dtype: torch.dtype = torch.float32):
    return load_backbone(name, device="cuda", dtype=dtype)


def _story(name):
    return parse_story(STORIES[name], name)


def _check_every_method(name, dtype=torch.float32):
    bb = backbone(name, dtype)
    results = {m: generate_story(bb, _story(name), m, num_inference_steps=STEPS, progress=False) for m in METHODS}
    for method, result in results.items():
        assert len(result.images) == 3, method
        for image in result.images:
            assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1, method
    assert results["isolated"].scenes[2].masks is not None
    assert set(results["isolated"].bank.characters) == set(_story(name).characters)
    assert np.abs(results["isolated"].images[2] - results["vanilla"].images[2]).max() > 1e-4
    off = generate_story(bb, _story(name), "isolated", config=IsolationConfig(lam=0.0), num_inference_steps=STEPS,
                         progress=False)
    for a, b in zip(off.images, results["vanilla"].images):
        assert np.array_equal(a, b), "λ = 0 must reproduce vanilla exactly"


def test_every_method_toy():
    _check_every_method("toy")


def test_every_method_sdxl_tiny():
    _check_every_method("sdxl-tiny")


def test_every_method_sdxl_tiny_fp16():
    _check_every_method("sdxl-tiny", torch.float16)


def test_no_sync_inside_isolated_layer_calls():
    """CUDA raises on any synchronising op (item, nonzero, copies to the host) inside a call."""
    originals = {cls: cls.__call__ for cls in (IsolatedSelfAttention, IsolatedCrossAttention)}
    counted = {"calls": 0}

    def strict(cls):
        def call(self, *args, **kwargs):
            if self.ctrl.masks is None:
                return originals[cls](self, *args, **kwargs)
            counted["calls"] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return originals[cls](self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call
    try:
        for cls in originals:
            cls.__call__ = strict(cls)
        for name in STORIES:
            generate_story(backbone(name), _story(name), "isolated", num_inference_steps=STEPS, progress=False)
    finally:
        for cls, f in originals.items():
            cls.__call__ = f
    assert counted["calls"] > 0


def test_vanilla_fp16_equals_stock_pipeline():
    from diffusers import StableDiffusionXLPipeline
    bb = backbone("sdxl-tiny", torch.float16)
    components = {k: v for k, v in bb.pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    stock = StableDiffusionXLPipeline(**components, add_watermarker=False)
    stock.set_progress_bar_config(disable=True)
    latents = bb.initial_latents([3])
    ours = bb.decode(bb.denoise(bb.encode(["a girl in the park"]), latents, num_inference_steps=STEPS,
                                guidance_scale=5.0, progress=False))
    size = bb.latent_shape[1] * bb.pipe.vae_scale_factor
    theirs = stock("a girl in the park", num_inference_steps=STEPS, guidance_scale=5.0, latents=latents.clone(),
                   height=size, width=size, output_type="np").images
    assert np.abs(ours - theirs).max() < 1e-3


def test_bank_on_the_gpu_and_a_bank_loaded_on_the_cpu_give_the_same_scene():
    """generate_story keeps a new bank on the GPU (no host copies per step); continuing from that
    bank saved and loaded on the CPU (one host-to-device copy per step) draws the same scene."""
    bb = backbone("toy")
    first = _story("toy")
    bank = generate_story(bb, first, "isolated", num_inference_steps=STEPS, progress=False).bank
    assert bank.device.type == "cuda"
    assert all(k.is_cuda and v.is_cuda for entries in bank.tokens.values() for k, v in entries.values())
    later = parse_story({**STORIES["toy"], "scenes": STORIES["toy"]["scenes"][2:]}, "toy-later")
    with tempfile.TemporaryDirectory() as folder:
        loaded = ReferenceBank.load(bank.save(Path(folder) / "bank.safetensors"))
    assert loaded.device.type == "cpu"
    on_cpu = generate_story(bb, later, "isolated", bank=loaded, num_inference_steps=STEPS, progress=False)
    on_gpu = generate_story(bb, later, "isolated", bank=bank, num_inference_steps=STEPS, progress=False)
    assert np.abs(on_cpu.images[0] - on_gpu.images[0]).max() < 1e-6


def test_cpu_offload_gives_the_same_image():
    plain = load_backbone("sdxl-tiny", device="cuda")
    offload = load_backbone("sdxl-tiny", device="cuda", cpu_offload=True)
    kwargs = dict(num_inference_steps=STEPS, progress=False)
    a = plain.generate(["a girl in the park"], [0], **kwargs)
    b = offload.generate(["a girl in the park"], [0], **kwargs)
    assert np.abs(a - b).max() < 1e-4


def test_csa_bank_on_the_host_under_offload_gives_the_same_images():
    """Under cpu_offload CSA's bank (both CFG halves, every layer and step) lives on the host and
    each read copies one layer's entries to the GPU: the images are those of a bank on the GPU."""
    plain = load_backbone("sdxl-tiny", device="cuda")
    offload = load_backbone("sdxl-tiny", device="cuda", cpu_offload=True)
    a = generate_story(plain, _story("sdxl-tiny"), "csa", num_inference_steps=STEPS, progress=False)
    b = generate_story(offload, _story("sdxl-tiny"), "csa", num_inference_steps=STEPS, progress=False)
    assert a.device_bank_bytes > 0 and b.device_bank_bytes == 0
    for x, y in zip(a.images, b.images):
        assert np.abs(x - y).max() < 1e-4


def test_csa_peak_memory_under_offload_is_within_2_gb_of_isolated():
    """Full-size SDXL (random weights), 1024², fp16, 30 steps, two characters, under cpu_offload:
    CSA's peak allocated memory is at most isolated attention's + 2 GB (its bank is on the host)."""
    bb = load_backbone("sdxl-random", device="cuda", dtype=torch.float16, cpu_offload=True)
    bb.decode = functools.partial(type(bb).decode, bb, check_finite=False)  # random weights: NaN images allowed
    story = parse_story({**STORIES["sdxl-tiny"], "scenes": STORIES["sdxl-tiny"]["scenes"] + [
        {"prompt": "a girl and a boy in the park", "characters": ["Lily", "Tom"], "seed": 4}]}, "peak")
    peaks = {}
    for method in ("isolated", "csa"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = generate_story(bb, story, method, num_inference_steps=30, progress=False)
        torch.cuda.synchronize()
        peaks[method] = torch.cuda.max_memory_allocated()
        assert result.device_bank_bytes == 0, method
    print(f"peak GiB under offload: { {m: round(v / 2**30, 2) for m, v in peaks.items()} }")
    assert peaks["csa"] <= peaks["isolated"] + 2e9, peaks


def test_ancestral_sampler_is_deterministic_on_the_gpu():
    """Euler-ancestral's noise comes from each scene's CPU generator: the same seeds give the same
    images after any use of the global RNG, on the GPU too."""
    from diffusers import EulerAncestralDiscreteScheduler
    bb = load_backbone("sdxl-tiny", device="cuda")
    bb.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(bb.pipe.scheduler.config)
    torch.manual_seed(1)
    a = generate_story(bb, _story("sdxl-tiny"), "isolated", num_inference_steps=STEPS, progress=False).images
    torch.manual_seed(2)
    torch.cuda.manual_seed(3)
    b = generate_story(bb, _story("sdxl-tiny"), "isolated", num_inference_steps=STEPS, progress=False).images
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_neutral_boxes_on_the_gpu_match_the_cpu():
    """Characters located on the GPU (one U-Net pass on the re-noised image) get the CPU's boxes."""
    from osa_lib.locate import locate_characters
    gpu, cpu = backbone("toy"), load_backbone("toy", device="cpu")
    image = generate_story(cpu, _story("toy"), "vanilla", progress=False).images[2]
    prompt, words = STORIES["toy"]["scenes"][2]["prompt"], ["circle", "square"]
    a, b = locate_characters(gpu, image, prompt, words), locate_characters(cpu, image, prompt, words)
    assert a.found == b.found
    for x, y in zip(a.boxes, b.boxes):
        assert (x is None) == (y is None) and (x is None or max(abs(i - j) for i, j in zip(x, y)) <= 1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device")
        sys.exit(0)
    failed = 0
    for name, fn in [(k, v) for k, v in dict(globals()).items() if k.startswith("test_") and callable(v)]:
        try:
            fn()
            print(f"PASSED {name}", flush=True)
        except Exception as error:  # noqa: BLE001 - report every test
            failed += 1
            print(f"FAILED {name}: {type(error).__name__}: {error}", flush=True)
    sys.exit(1 if failed else 0)

"""StoryDiffusion's Consistent Self-Attention as its code does it (osa_lib/baselines.py)."""
import numpy as np
import pytest
import torch

from osa_lib.attention import LayerInfo, find_attention_layers
from osa_lib.baselines import (CSABank, CSAConfig, CSAController, ConsistentSelfAttention, consistent_self_attention,
                               csa_layers, reference_scenes)
from osa_lib.generation import generate_story
from osa_lib.story import load_story, parse_story

STEPS = 3
STORY = {"characters": [{"name": "Lily", "word": "girl", "id_prompt": "a girl with blonde hair"},
                        {"name": "Tom", "word": "boy", "id_prompt": "a boy with black hair"}],
         "scenes": [{"prompt": "a girl reading a book in the park", "characters": ["Lily"], "seed": 1},
                    {"prompt": "a girl on the beach", "characters": ["Lily"], "seed": 2},
                    {"prompt": "a boy with a dog on the beach", "characters": ["Tom"], "seed": 3},
                    {"prompt": "a girl and a boy in the snow", "characters": ["Lily", "Tom"], "seed": 4}]}


@pytest.fixture(scope="module")
def story():
    return parse_story(STORY, "csa-story")


@pytest.fixture(scope="module")
def vanilla(tiny, story):
    return generate_story(tiny, story, "vanilla", num_inference_steps=STEPS, progress=False)


def test_only_up_block_self_attention_is_replaced(tiny):
    layers = csa_layers(tiny.unet)
    controller = CSAController(layers, tuple(tiny.latent_shape[1:]), CSAConfig(), seed=0, read_keys=[])
    with consistent_self_attention(tiny.unet, controller):
        replaced = {n for n, p in tiny.unet.attn_processors.items() if isinstance(p, ConsistentSelfAttention)}
    every = find_attention_layers(tiny.unet)
    assert replaced == {l.name for l in every if l.place == "up" and l.kind == "self"}
    assert replaced and all(n.startswith("up_blocks") and ".attn1." in n for n in replaced)
    assert not any(isinstance(p, ConsistentSelfAttention) for p in tiny.unet.attn_processors.values()), "restored"


@pytest.mark.parametrize("csa", [CSAConfig.with_rate(0.0), CSAConfig(skip_early=1.0, skip_late=1.0)],
                         ids=["rate 0", "always skipped"])
def test_no_shared_tokens_equals_vanilla_exactly(tiny, story, vanilla, csa):
    """Bit for bit equal to the unmodified model run on the same batches (Lily's two reference
    scenes together, then one scene at a time); a batch of two differs from two single runs only
    by float rounding in the batched matmuls."""
    result = generate_story(tiny, story, "csa", csa_config=csa, num_inference_steps=STEPS, progress=False)
    batched = tiny.generate([s.prompt for s in story.scenes[:2]], [1, 2], num_inference_steps=STEPS, progress=False)
    expected = list(batched) + vanilla.images[2:]
    for ours, theirs, single in zip(result.images, expected, vanilla.images):
        assert np.array_equal(ours, theirs)
        assert np.allclose(ours, single, atol=1e-5)


def test_step_zero_is_plain_self_attention(tiny, story):
    csa = CSAConfig(skip_early=0.0, skip_late=0.0)  # never skipped after step 0
    one = generate_story(tiny, story, "csa", csa_config=csa, num_inference_steps=1, progress=False)
    plain = generate_story(tiny, story, "csa", csa_config=CSAConfig.with_rate(0.0), num_inference_steps=1,
                           progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(one.images, plain.images))


def test_csa_changes_the_images_and_is_deterministic(tiny, story, vanilla):
    csa = CSAConfig(skip_early=0.0, skip_late=0.0)
    a = generate_story(tiny, story, "csa", csa_config=csa, num_inference_steps=STEPS, progress=False)
    b = generate_story(tiny, story, "csa", csa_config=csa, num_inference_steps=STEPS, progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images)), "same seeds, same story"
    assert [s.seed for s in a.scenes] == [s.seed for s in vanilla.scenes]
    # scenes 0, 1 (Lily alone) are a reference batch; 2 (Tom's only scene) is a batch of one, plain;
    # scene 3 reads the bank of both
    assert np.abs(a.images[0] - vanilla.images[0]).max() > 1e-4
    assert np.array_equal(a.images[2], vanilla.images[2])
    assert np.abs(a.images[3] - vanilla.images[3]).max() > 1e-4


def test_reference_scenes_follow_storydiffusion_with_named_fallback(story):
    assert reference_scenes(story, id_length=2) == {"Lily": [0, 1], "Tom": [2]}
    assert reference_scenes(story, id_length=1) == {"Lily": [0], "Tom": [2]}
    together = load_story("data/stories/toy_two_contrasting.yaml")  # never alone: the first scene
    assert reference_scenes(together) == {"Sunny": [0], "Blu": [0]}


def _layers(sizes):
    return [LayerInfo(f"up_blocks.{i}.attn1.processor", "up", i, "self", 64 // s) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("sa32, sa64", [(0.5, 0.5), (0.2, 0.7)])
def test_sampled_share_matches_the_rate_per_resolution(sa32, sa64):
    layers = _layers([32, 64])  # smallest resolution: sa32, the other: sa64
    ctl = CSAController(layers, (64, 64), CSAConfig(sa32=sa32, sa64=sa64), seed=0, write_keys=[0, 1, 2])
    shares = {32: [], 64: []}
    for step in range(10):
        for layer in layers:
            hw = layer.resolution((64, 64))
            for idx in ctl.step_indices(hw, "cpu"):
                shares[hw[0]].append(len(idx) / (hw[0] * hw[1]))
            ctl.paired()
            ctl.layer_done()
    assert np.mean(shares[32]) == pytest.approx(sa32, abs=0.02)
    assert np.mean(shares[64]) == pytest.approx(sa64, abs=0.01)


def test_skip_probabilities_follow_the_step():
    ctl = CSAController(_layers([8]), (64, 64), CSAConfig(skip_switch_step=20), seed=0, write_keys=[0, 1])
    for step in range(40):
        for _ in range(200):  # 200 "layers" share one step here
            ctl.step_indices((8, 8), "cpu")
            ctl.paired()
            ctl.calls = 1  # stay in the step
        ctl.calls, ctl.step, ctl.indices = 0, ctl.step + 1, {}
    paired = [np.mean(h["paired"]) for h in ctl.history]
    assert paired[0] == 0.0, "step 0 runs plain self-attention"
    assert np.mean(paired[1:20]) == pytest.approx(0.7, abs=0.03)
    assert np.mean(paired[20:]) == pytest.approx(0.9, abs=0.03)


def test_every_layer_of_a_step_uses_the_same_sample(tiny, story, monkeypatch):
    seen = []  # (step, layer, resolution, indices)
    original = CSAController.step_indices

    def spy(self, hw, device):
        rows = original(self, hw, device)
        if self.writing:
            seen.append((id(self), self.step, hw, [r.tolist() for r in rows]))
        return rows

    monkeypatch.setattr(CSAController, "step_indices", spy)
    generate_story(tiny, story, "csa", num_inference_steps=STEPS, progress=False)
    first = seen[0][0]  # the first reference batch (Lily's two scenes)
    by_step = {}
    for controller, step, hw, rows in seen:
        if controller == first:
            by_step.setdefault((step, hw), []).append(rows)
    n_layers = len(csa_layers(tiny.unet))
    assert sum(len(v) for k, v in by_step.items() if k[0] == 0) == n_layers
    for rows in by_step.values():
        assert all(r == rows[0] for r in rows), "one sample per step, shared by every layer"
    steps = sorted({s for s, _ in by_step})
    hw = sorted({h for _, h in by_step})[-1]
    assert by_step[(steps[0], hw)][0] != by_step[(steps[1], hw)][0], "a new sample every step"


def test_bank_holds_each_reference_images_sampled_tokens_per_step(tiny, story):
    layers = csa_layers(tiny.unet)
    bank = CSABank()
    ctl = CSAController(layers, tuple(tiny.latent_shape[1:]), CSAConfig(), seed=1, write_keys=[0, 1], bank=bank)
    with consistent_self_attention(tiny.unet, ctl):
        tiny.denoise(tiny.encode([story.scenes[0].prompt, story.scenes[1].prompt]), tiny.initial_latents([1, 2]),
                     num_inference_steps=STEPS, progress=False)
    assert sorted(bank.entries) == [0, 1]
    for key in (0, 1):
        assert sorted(bank.entries[key]) == list(range(STEPS)), "written every step, step 0 included"
        for step, layers_seen in bank.entries[key].items():
            assert set(layers_seen) == {l.name for l in layers}
            for layer in layers:
                tokens = layers_seen[layer.name]
                n = len(ctl.history[step]["indices"][layer.resolution(ctl.latent_hw)][key])
                assert tokens.shape[0] == 2 and tokens.shape[1] == n  # both CFG halves, the sampled tokens
    assert bank.nbytes() > 0 and ctl.step == STEPS


def test_csa_bank_keeps_its_tokens_where_it_is_told_and_reads_them_to_the_reader(tiny, two_characters, monkeypatch):
    """Under cpu_offload the backbone's bank device is the host, and CSA's bank is made there;
    ``write`` stores on the bank's device, ``read`` copies to the reading device."""
    from osa_lib import generation
    from osa_lib.baselines import CSABank
    bank = CSABank(device=torch.device("meta"))  # "meta": a device other than the tokens', on any machine
    bank.write(0, 1, "layer", torch.randn(2, 3, 4))
    assert bank.entries[0][1]["layer"].is_meta
    here = CSABank()
    here.write(0, 1, "layer", torch.randn(2, 3, 4))
    assert [t.is_meta for t in here.read([0, 0], 1, "layer", device="meta")] == [True, True]
    assert here.read([0], 1, "layer")[0].device.type == "cpu"
    made = []

    class Recording(CSABank):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.device)

    monkeypatch.setattr(generation, "CSABank", Recording)
    monkeypatch.setitem(tiny.info, "cpu_offload", True)
    result = generation.generate_story(tiny, parse_story(two_characters), "csa", num_inference_steps=2, progress=False)
    assert made == [torch.device("cpu")] and result.device_bank_bytes == 0

"""Flip-books (``osa_lib.video``) and their measures (``osa_lib.toy.flipbook``): the motion against
hand-written translations and Text2Video-Zero's own warp, cross-frame attention against diffusers'
``AttnProcessor2_0`` and a hand-written reference, λ = 0, determinism, bad input before any
U-Net call, and the measures on hand-drawn frames with known centroids and colours."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from osa_lib.backbones import load_backbone
from osa_lib.generation import generate_story
from osa_lib.story import StoryError, parse_story
from osa_lib.toy import world
from osa_lib.toy.flipbook import flipbook_metrics, motion_compensated_change
from osa_lib.video import (CrossFrameAttention, FlipbookError, draw_flipbook, first_frame, frame_offsets,
                           moving_latents, paired_differences, translate_latent)

PAIR = "a red circle and a blue square in the meadow"


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


# --- motion ----------------------------------------------------------------------------------
def test_frame_offsets_round_each_frame_half_up():
    assert frame_offsets(5, (0.0, 0.5)).tolist() == [[0, 0], [0, 1], [0, 1], [0, 2], [0, 2]]
    assert frame_offsets(3, (-1.0, 0.25)).tolist() == [[0, 0], [-1, 0], [-2, 1]]


def test_translate_latent_matches_a_hand_written_shift():
    latent = torch.arange(16.0).view(1, 4, 4)  # rows [0 1 2 3], [4 5 6 7], ...
    right = translate_latent(latent, (0, 1))  # content moves one column right, column 0 mirrors column 0
    assert right[0].tolist() == [[0, 0, 1, 2], [4, 4, 5, 6], [8, 8, 9, 10], [12, 12, 13, 14]]
    up_left = translate_latent(latent, (-1, -2))  # one row up, two columns left; mirrored at the bottom/right
    assert up_left[0].tolist() == [[6, 7, 7, 6], [10, 11, 11, 10], [14, 15, 15, 14], [14, 15, 15, 14]]
    assert torch.equal(translate_latent(latent, (0, 0)), latent)


def test_translate_latent_is_text2video_zeros_warp():
    """diffusers' ``warp_single_latent`` (Text2Video-Zero's) with a flow of -offset latent pixels, in
    its 512-pixel units, gives the same latent on the toy's 16×16 grid."""
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import warp_single_latent
    latent = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    for dy, dx in ((0, 1), (0, 3), (2, -1), (-4, 4)):
        flow = torch.empty(1, 2, 512, 512)
        flow[:, 0], flow[:, 1] = -dx * 512 / 16, -dy * 512 / 16  # x then y, pixels of a 512 image
        assert torch.equal(translate_latent(latent, (dy, dx)), warp_single_latent(latent, flow)), (dy, dx)


def test_moving_latents_moves_frame_k_by_its_offset():
    latent = torch.randn(12, 16, 16, generator=torch.Generator().manual_seed(1))
    offsets = frame_offsets(4, (0.5, 1.0))
    frames = moving_latents(latent, offsets)  # (4, 12, 16, 16)
    assert frames.shape == (4, 12, 16, 16) and torch.equal(frames[0], latent)
    assert torch.equal(frames[3][:, 2:, 3:], latent[:, :-2, :-3])  # frame 3: (2, 3) latent pixels


# --- cross-frame attention -------------------------------------------------------------------
def _attention():
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8).eval()


def test_cross_frame_attention_off_is_attn_processor_2_0():
    attn, x = _attention(), torch.randn(2 * 3, 10, 16)
    with torch.no_grad():
        assert torch.equal(CrossFrameAttention(3, enabled=False)(attn, x), AttnProcessor2_0()(attn, x))


def test_cross_frame_attention_on_copies_of_the_first_frame_is_plain_attention():
    attn, groups = _attention(), torch.randn(2, 1, 10, 16)
    x = groups.expand(2, 4, 10, 16).reshape(8, 10, 16)  # [negative ×4; prompt ×4], every frame its group's first
    with torch.no_grad():
        torch.testing.assert_close(CrossFrameAttention(4)(attn, x), AttnProcessor2_0()(attn, x), rtol=0, atol=1e-6)


def test_cross_frame_attention_reads_the_first_frame_of_its_own_half():
    """Hand-written reference: frame f of half g attends with its own queries to frame 0 of half g."""
    attn, frames = _attention(), 3
    x = torch.randn(2 * frames, 10, 16)
    with torch.no_grad():
        out = CrossFrameAttention(frames)(attn, x)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (6, 10, 16)
        for i in range(2 * frames):
            first = (i // frames) * frames  # the first frame of this image's half
            heads = []
            for h in range(2):
                sl = slice(8 * h, 8 * h + 8)
                weights = torch.softmax(q[i, :, sl] @ k[first, :, sl].T / 8 ** 0.5, dim=-1)  # (10, 10)
                heads.append(weights @ v[first, :, sl])
            expected = attn.to_out[0](torch.cat(heads, dim=-1))
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(first_frame(torch.arange(6.0).view(6, 1, 1), 3).flatten(), torch.tensor([0., 0, 0, 3, 3, 3]))


# --- drawing -----------------------------------------------------------------------------------
def test_lambda_zero_isolated_flipbook_is_vanilla_exactly(toy):
    kwargs = dict(n_frames=3, shift=(0, 1), seed=5, num_inference_steps=3)
    vanilla = draw_flipbook(toy, PAIR, "vanilla", **kwargs)
    off = draw_flipbook(toy, PAIR, "isolated", config=toy.isolation_config(lam=0.0), **kwargs)
    on = draw_flipbook(toy, PAIR, "isolated", **kwargs)
    assert np.array_equal(off.frames, vanilla.frames)
    assert not np.array_equal(on.frames[1:], vanilla.frames[1:])  # the isolated branch acts on later frames


def test_vanilla_frames_start_from_the_moved_noise(toy):
    """Frame k of a vanilla flip-book is the unmodified model from frame 0's noise moved by its offset."""
    book = draw_flipbook(toy, PAIR, "vanilla", n_frames=3, shift=(0, 1), seed=5, num_inference_steps=3)
    noise = translate_latent(toy.initial_latents([5])[0], (0, 2))
    expected = toy.decode(toy.denoise(toy.encode([PAIR]), noise[None], 3, progress=False))[0]
    assert np.array_equal(book.frames[2], expected)
    assert book.pixel_offsets.tolist() == [[0, 0], [0, 2], [0, 4]]  # the toy's latent pixel is 2 image pixels


@pytest.mark.parametrize("method", ["cross-frame", "isolated"])
def test_flipbooks_are_deterministic(toy, method):
    kwargs = dict(n_frames=3, shift=(0, 0.5), num_inference_steps=3)
    first = draw_flipbook(toy, PAIR, method, seed=7, **kwargs)
    again = draw_flipbook(toy, PAIR, method, seed=7, **kwargs)
    other = draw_flipbook(toy, PAIR, method, seed=8, **kwargs)
    assert np.array_equal(first.frames, again.frames) and not np.array_equal(first.frames, other.frames)


def test_cross_frame_changes_later_frames_only(toy):
    kwargs = dict(n_frames=3, shift=(0, 1), seed=3, num_inference_steps=3)
    vanilla, cross = draw_flipbook(toy, PAIR, "vanilla", **kwargs), draw_flipbook(toy, PAIR, "cross-frame", **kwargs)
    np.testing.assert_allclose(cross.frames[0], vanilla.frames[0], atol=1e-4)  # frame 0 attends to itself
    assert np.abs(cross.frames[1:] - vanilla.frames[1:]).max() > 0.05


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_frames=0), "n_frames=0"), (dict(n_frames=1), "from 2"), (dict(n_frames=True), "n_frames=True"),
    (dict(n_frames=8.0), "whole number"), (dict(n_frames=99), "to 32"),
    (dict(n_frames=8, shift=(0, 1)), "out of the frame"), (dict(n_frames=16, shift=(-0.5, 0)), "out of the frame"),
    (dict(shift=(0, float("nan"))), "finite"), (dict(shift=3), "two numbers"),
    (dict(method="sora"), "unknown method"), (dict(characters=["triangle"]), "'triangle' is missing from the prompt"),
    (dict(seed=-1), "seed"), (dict(num_inference_steps=0), "num_inference_steps"),
])
def test_bad_input_is_refused_before_any_unet_call(toy, monkeypatch, kwargs, words):
    def no_unet(*args, **kw):
        raise AssertionError("the U-Net ran")
    monkeypatch.setattr(toy, "denoise", no_unet)
    with pytest.raises(FlipbookError, match=words.replace("(", r"\(").replace(")", r"\)")):
        draw_flipbook(toy, PAIR, **{"method": "vanilla", **kwargs})


def test_a_prompt_outside_the_grammar_is_refused(toy):
    with pytest.raises(FlipbookError, match="grammar|expected|word"):
        draw_flipbook(toy, "a red dragon in the meadow", "vanilla")


def test_generate_story_refuses_starting_noise_of_the_wrong_shape(toy):
    story = parse_story({"characters": [{"name": "c", "word": "circle", "id_prompt": "a red circle"}],
                         "scenes": [{"prompt": "a red circle in the snow", "characters": ["c"], "seed": 1}] * 2})
    with pytest.raises(StoryError, match=r"shape \(2, 12, 16, 16\)"):
        generate_story(toy, story, "vanilla", initial_latents=torch.zeros(3, 12, 16, 16))
    noise = toy.initial_latents([1, 1])
    given = generate_story(toy, story, "vanilla", initial_latents=noise, num_inference_steps=2, progress=False)
    seeded = generate_story(toy, story, "vanilla", num_inference_steps=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(given.images, seeded.images))


# --- measures on hand-drawn frames -------------------------------------------------------------
def _character(shape, colour, center, size=6.0):
    return world.Character(shape, colour, world.COLOURS[colour], 0.9, size, "none", "light", center)


def _frame(characters) -> np.ndarray:
    """A 32×32 frame: a flat muted background and each character's shape in its colour."""
    image = np.full((32, 32, 3), (0.55, 0.6, 0.5), np.float32)
    for c in characters:
        image[world.shape_mask(c.shape, c.center, c.size)] = np.array(c.rgb) / 255
    return image


def _flipbook(moves, colours=("red", "blue"), shapes=("circle", "square")):
    """Frames whose circle sits at (9, 6 + move) and square at (25, 18 + move), 4 pixels apart at the
    least (the analyzer joins pixels of one colour less than 3 apart); the circle wears the square's
    colour in frame 2."""
    return np.stack([_frame([_character(shapes[0], colours[0] if k != 2 else colours[1], (9.0, 6.0 + m)),
                             _character(shapes[1], colours[1], (25.0, 18.0 + m))]) for k, m in enumerate(moves)])


def test_metrics_of_a_clean_flipbook_that_follows_its_shift():
    moves = [0, 2, 4, 6]
    frames = np.stack([_frame([_character("circle", "red", (9.0, 6.0 + m)), _character("square", "blue", (25.0, 18.0 + m))])
                       for m in moves])
    offsets = np.array([[0, m] for m in moves])
    got = flipbook_metrics(frames, ["circle", "square"], ["red", "blue"], offsets)
    assert got["drawn"] == 100 and got["colour kept"] == 100 and got["mixed"] == 0
    assert got["identity constancy"] == pytest.approx(100, abs=1) and got["motion followed"] == 100
    assert got["motion error"] == pytest.approx(0, abs=1e-9) and got["flicker"] == pytest.approx(0, abs=1e-9)
    assert got["multi-character frames"] == 3 and got["compared"] == 6


def test_metrics_see_a_character_that_stands_still_and_one_that_changes_colour():
    moves = [0, 0, 0, 0]  # drawn still, but the noise was moved 0, 2, 4, 6 pixels
    frames = _flipbook(moves)  # and the circle is blue in frame 2
    offsets = np.array([[0, 0], [0, 2], [0, 4], [0, 6]])
    got = flipbook_metrics(frames, ["circle", "square"], ["red", "blue"], offsets)
    assert got["motion error"] == pytest.approx(np.mean([2, 4, 6]), abs=1e-6)  # both characters, frames 1-3
    assert got["motion followed"] == pytest.approx(100 / 3)  # frame 1 is within one latent pixel (2 px)
    assert got["mixed frames"] == 1 and got["mixed"] == pytest.approx(100 / 3)  # frame 2 of 3 later frames
    assert got["colour kept"] == pytest.approx(100 * 5 / 6)
    assert got["per character"]["circle"]["colour kept"] == pytest.approx(100 * 2 / 3)
    assert got["per character"]["square"]["colour kept"] == 100


def test_uncoloured_characters_are_mixed_against_their_first_frame_colour():
    frames = _flipbook([0, 0, 0, 0])  # circle red, blue in frame 2; the square blue
    got = flipbook_metrics(frames, ["circle", "square"], [None, None], np.zeros((4, 2)))
    assert got["mixed frames"] == 1 and got["colour kept"] == pytest.approx(100 * 5 / 6)


def test_a_colour_swap_is_mixing_against_the_first_frame():
    """Uncoloured characters that swap colours in frame 2 are mixed there: each wears the colour the
    other had in frame 0, though not the colour the other wears in frame 2."""
    frames = _flipbook([0, 0, 0, 0])
    frames[2] = _frame([_character("circle", "blue", (9.0, 6.0)), _character("square", "red", (25.0, 18.0))])
    got = flipbook_metrics(frames, ["circle", "square"], [None, None], np.zeros((4, 2)))
    assert got["mixed frames"] == 1 and got["colour kept"] == pytest.approx(100 * 4 / 6)


def test_flicker_is_the_change_inside_a_character_after_undoing_the_shift():
    before = np.zeros((4, 4, 3), np.float32)
    after = np.zeros((4, 4, 3), np.float32)
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = mask[2, 1] = True
    after[1, 2] = 0.5  # pixel (1, 1) moved one column right, and changed by 0.5 in every channel
    assert motion_compensated_change(before, after, mask, (0, 1)) == pytest.approx(0.25)
    assert motion_compensated_change(before, after, mask, (0, 0)) == 0
    assert np.isnan(motion_compensated_change(before, after, mask, (0, 5)))  # moved out of the frame


def test_paired_differences_pair_the_same_seeds():
    rows = [{"prompt": "p", "seed": s, "method": m, "mixed": v} for s, (a, b) in enumerate([(10, 4), (20, 10), (30, 10)])
            for m, v in (("isolated", a), ("cross-frame", b))]
    row = paired_differences(rows, ["mixed"], pairs=(("isolated", "cross-frame"),))[0]
    mean, sem, n = row["mixed"]
    assert (mean, n) == (12, 3) and sem == pytest.approx(np.std([6, 10, 20], ddof=1) / np.sqrt(3))

"""The drawn pool (osa_lib.toy.drawn_pool): the model's own drawings of uncoloured captions as
training references, written and read back whole, and put into reference pairs as drawn."""
import numpy as np
import pytest

from osa_lib.toy import world
from osa_lib.toy.drawn_pool import draw_pool, load_pool, save_pool
from osa_lib.toy.model import DEFAULT_MODEL_DIR, ToyPipeline


@pytest.fixture(scope="module")
def pool():
    pipe = ToyPipeline.from_pretrained(DEFAULT_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return draw_pool(pipe, n=8, seed=0, batch_size=4)


def test_pool_holds_drawings_of_uncoloured_captions_read_back_by_the_analyzer(pool):
    from osa_lib.toy.analyzer import analyze_image, largest_detection
    assert 0 < len(pool) <= 8
    for entry in pool:
        character = entry.characters[0]
        assert not any(w in world.COLOURS for w in entry.caption.split()), entry.caption
        assert character.shape in entry.caption and entry.scene in entry.caption
        read = largest_detection(analyze_image(entry.image / 255.0), character.shape)
        assert read is not None and (read.colour, read.mark) == (character.colour, character.mark)
        assert (character.colour, character.shape, entry.scene) not in world.HELD_OUT_TRIPLES


def test_pool_file_round_trip_is_exact_and_written_atomically(pool, tmp_path):
    path = tmp_path / "pool.npz"
    save_pool(pool, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.npz"]  # no temporary file left
    back = load_pool(path)
    assert len(back) == len(pool)
    for a, b in zip(pool, back):
        assert (a.caption, a.scene, a.characters[0]) == (b.caption, b.scene, b.characters[0])
        assert np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype == np.uint8
        assert np.array_equal(a.masks, b.masks) and b.masks.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="empty"):
        save_pool([], tmp_path / "none.npz")
    assert not (tmp_path / "none.npz").exists()


def test_unreadable_or_foreign_pool_files_are_clear_errors(tmp_path):
    (tmp_path / "text.npz").write_text("not a pool")
    with pytest.raises(ValueError, match=r"cannot read drawn pool .*python -m osa_lib.toy.drawn_pool"):
        load_pool(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="cannot read drawn pool"):
        load_pool(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"not a drawn pool \(no \['masks'"):
        load_pool(tmp_path / "other.npz")


def test_a_pair_from_a_drawn_reference_renders_the_character_as_read(pool):
    """``sample_pair(reference=drawn)``: the reference is the drawing itself (index 0) and the
    target holds its character, every detail as the analyzer read it, somewhere else."""
    rng = np.random.default_rng(0)
    drawn = pool[0]
    reference, target, i_ref, i_tgt = world.sample_pair(rng, exclude=world.HELD_OUT_TRIPLES, reference=drawn)
    assert reference is drawn and i_ref == 0
    shared = target.characters[i_tgt]
    assert {**vars(shared), "center": None} == {**vars(drawn.characters[0]), "center": None}
    assert target.masks[i_tgt].any()


def test_scene_stream_takes_a_share_of_its_references_from_the_pool(pool):
    from osa_lib.toy.train import SceneStream
    images, captions, partner, *_ = next(iter(SceneStream(8, seed=0, p_empty_caption=0.0, pair_rate=1.0,
                                                          drawn_pool=pool, drawn_share=1.0)))
    drawn_images = [np.asarray(p.image) for p in pool]
    references = ((images[:4].permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()  # (4, 32, 32, 3)
    assert all(any(np.array_equal(r, d) for d in drawn_images) for r in references)
    assert all(c in {p.caption for p in pool} for c in captions[:4])
    rendered_images, *_ = next(iter(SceneStream(8, seed=0, p_empty_caption=0.0, pair_rate=1.0)))
    references = ((rendered_images[:4].permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    assert not any(np.array_equal(r, d) for r in references for d in drawn_images)
    with pytest.raises(ValueError, match="--drawn-pool"):
        SceneStream(8, seed=0, pair_rate=1.0, drawn_share=0.5)


def test_training_reads_the_pool_named_on_its_command_line(pool, tmp_path, monkeypatch):
    from osa_lib.toy import train as training
    from osa_lib.toy.model import build_toy_pipeline
    save_pool(pool, tmp_path / "pool.npz")
    build_toy_pipeline(seed=3).save_pretrained(tmp_path / "start")
    streams = []
    real = training.SceneStream
    monkeypatch.setattr(training, "SceneStream", lambda *a, **k: streams.append(real(*a, **k)) or streams[-1])
    training.main(["--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "model"), "--init-from",
                   str(tmp_path / "start"), "--pair-rate", "1.0", "--train-only", "up-self-attention",
                   "--drawn-pool", str(tmp_path / "pool.npz"), "--drawn-share", "0.5"])
    assert streams[0].drawn_share == 0.5 and len(streams[0].drawn_pool) == len(pool)

"""osa_lib.toy.delta: a fine-tune stored as the tensors it changed, rebuilt on its base."""
import json

import pytest
import torch

from osa_lib.toy.delta import apply_delta, main, save_delta, weights_fingerprint
from osa_lib.toy.model import ToyPipeline, build_toy_pipeline


@pytest.fixture
def base_and_tuned(tmp_path):
    """A tiny untrained pipeline and a copy with two up-block self-attention tensors changed."""
    base = build_toy_pipeline(seed=0, text_layers=0)
    base.save_pretrained(tmp_path / "base")
    tuned = build_toy_pipeline(seed=0, text_layers=0)
    names = sorted(k for k in tuned.unet.state_dict() if k.startswith("up_blocks.") and ".attn1.to_q." in k)[:2]
    with torch.no_grad():
        for name in names:
            tuned.unet.state_dict()[name].add_(0.25)
    tuned.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / "training.json").write_text(json.dumps({"step": 7, "minutes": 1.0, "resumes": 0}))
    return tmp_path, base, tuned, names


def test_delta_holds_only_the_changed_tensors_and_rebuilds_the_fine_tune_exactly(base_and_tuned):
    tmp_path, base, tuned, names = base_and_tuned
    stored = save_delta(tmp_path / "tuned", tmp_path / "base", tmp_path / "d.safetensors", note="recipe")
    assert stored == sorted("unet." + n for n in names)
    rebuilt = apply_delta(tmp_path / "d.safetensors", tmp_path / "base", tmp_path / "rebuilt")
    reloaded = ToyPipeline.from_pretrained(tmp_path / "rebuilt")
    assert weights_fingerprint(reloaded) == weights_fingerprint(tuned) == weights_fingerprint(rebuilt)
    assert weights_fingerprint(reloaded) != weights_fingerprint(base)
    assert json.loads((tmp_path / "rebuilt" / "training.json").read_text())["step"] == 7
    assert not (tmp_path / "rebuilt.tmp").exists()


def test_delta_refuses_another_base_and_a_file_that_is_not_a_delta(base_and_tuned):
    tmp_path, base, tuned, names = base_and_tuned
    save_delta(tmp_path / "tuned", tmp_path / "base", tmp_path / "d.safetensors")
    other = build_toy_pipeline(seed=1, text_layers=0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="other weights than"):
        apply_delta(tmp_path / "d.safetensors", tmp_path / "other", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the fine-tune delta"):
        apply_delta(tmp_path / "junk.safetensors", tmp_path / "base", tmp_path / "out")
    with pytest.raises(ValueError, match="different architectures"):
        build_toy_pipeline(seed=0, text_layers=1).save_pretrained(tmp_path / "wider")
        save_delta(tmp_path / "wider", tmp_path / "base", tmp_path / "e.safetensors")


def test_apply_copies_the_fine_tunes_isolation_switches_and_refuses_a_bad_file(base_and_tuned):
    from osa_lib import IsolationConfig, load_backbone
    tmp_path, base, tuned, names = base_and_tuned
    save_delta(tmp_path / "tuned", tmp_path / "base", tmp_path / "d.safetensors")
    (tmp_path / "isolation.json").write_text('{"defaults": {"mask_area_cap": 0.1, "warmup": 0.0}, "why": "test"}')
    main(["apply", str(tmp_path / "d.safetensors"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "with"),
          "--isolation", str(tmp_path / "isolation.json")])
    assert load_backbone("toy", model_id=str(tmp_path / "with"), device="cpu").isolation_config(tuned=True) == \
        IsolationConfig(mask_area_cap=0.1, warmup=0.0)
    (tmp_path / "bad.json").write_text('{"defaults": {"mask_area_cap": 2}}')
    with pytest.raises(ValueError, match=r"bad.json is not a valid isolation defaults file .*mask_area_cap=2"):
        apply_delta(tmp_path / "d.safetensors", tmp_path / "base", tmp_path / "out", tmp_path / "bad.json")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_drift_below_atol_is_left_out_and_everything_above_it_kept(base_and_tuned):
    tmp_path, base, tuned, names = base_and_tuned
    drifted = ToyPipeline.from_pretrained(tmp_path / "tuned")
    with torch.no_grad():
        drifted.text_encoder.state_dict()["embeddings.token_embedding.weight"].add_(2e-6)
    drifted.save_pretrained(tmp_path / "drifted")
    assert len(save_delta(tmp_path / "drifted", tmp_path / "base", tmp_path / "d.safetensors")) == 3
    assert save_delta(tmp_path / "drifted", tmp_path / "base", tmp_path / "d.safetensors", atol=1e-5) == \
        sorted("unet." + n for n in names)


def test_delta_command_line_round_trip(base_and_tuned, capsys):
    tmp_path, base, tuned, names = base_and_tuned
    main(["save", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "d.safetensors")])
    assert "2 tensors" in capsys.readouterr().out
    main(["apply", str(tmp_path / "d.safetensors"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "r")])
    assert weights_fingerprint(ToyPipeline.from_pretrained(tmp_path / "r")) == weights_fingerprint(tuned)


def test_the_default_toy_backbone_is_the_base_with_the_committed_fine_tune_and_its_tuned_switches():
    from safetensors.torch import load_file
    from osa_lib import load_backbone
    from osa_lib.toy.delta import SHIPPED_DELTA, SHIPPED_ISOLATION
    from osa_lib.toy.model import DEFAULT_MODEL_DIR
    shipped, base = load_backbone("toy", device="cpu"), ToyPipeline.from_pretrained(DEFAULT_MODEL_DIR)
    delta = load_file(str(SHIPPED_DELTA))
    changed = 0
    for part in ("unet", "text_encoder"):
        own = getattr(base, part).state_dict()
        for name, tensor in getattr(shipped.pipe, part).state_dict().items():
            expected = delta.get(f"{part}.{name}", own[name])  # the fine-tune's tensor where it has one
            assert torch.equal(tensor, expected), f"{part}.{name}"
            changed += not torch.equal(tensor, own[name])
    assert changed == len(delta) > 0
    assert shipped.tuned_isolation == json.loads(SHIPPED_ISOLATION.read_text())["defaults"] != {}
    assert shipped.info["finetune"] == str(SHIPPED_DELTA) and shipped.info["variant"] == "isolation-tuned"
    assert "isolated attention's own view" in shipped.info["variant_note"]
    # a folder is loaded as it is, and so is the base variant: the base alone, with no tuned switches
    plain = load_backbone("toy", model_id=str(DEFAULT_MODEL_DIR), device="cpu")
    assert plain.tuned_isolation == {} and weights_fingerprint(plain.pipe) == weights_fingerprint(base)
    named = load_backbone("toy", variant="base", device="cpu")
    assert named.tuned_isolation == {} and weights_fingerprint(named.pipe) == weights_fingerprint(base)
    assert "finetune" not in named.info and named.info["variant"] == "base"


def test_a_variant_is_a_toy_name_given_instead_of_a_folder():
    from osa_lib import load_backbone
    with pytest.raises(ValueError, match="unknown toy variant 'neutrall'; choose one of"):
        load_backbone("toy", variant="neutrall", device="cpu")
    with pytest.raises(ValueError, match="not both"):
        load_backbone("toy", variant="base", model_id="data/toy_model", device="cpu")
    with pytest.raises(ValueError, match="the sdxl-tiny backbone has none"):
        load_backbone("sdxl-tiny", variant="base", device="cpu")


def test_the_default_toy_backbone_without_its_fine_tune_says_what_is_missing_and_the_fix(tmp_path, monkeypatch):
    import osa_lib.toy.delta as delta
    from osa_lib import load_backbone
    _, isolation, note = delta.TOY_VARIANTS[delta.DEFAULT_TOY_VARIANT]
    monkeypatch.setitem(delta.TOY_VARIANTS, delta.DEFAULT_TOY_VARIANT, (tmp_path / "gone.safetensors", isolation, note))
    with pytest.raises(FileNotFoundError, match="gone.safetensors is missing") as info:
        load_backbone("toy", device="cpu")
    assert f"git checkout -- {tmp_path}" in str(info.value) and "variant='base'" in str(info.value)

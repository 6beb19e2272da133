"""The reference bank: storage, size, disk round trip, damaged files, compatibility, atomic writes."""
import copy
import json
import os

import pytest
import torch

from osa_lib.bank import BANK_FORMAT_VERSION, BankError, ReferenceBank, drawn_with, weights_fingerprint

LAYERS = ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
          "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor")


def make_bank(seed: int = 0, dtype=torch.float32) -> ReferenceBank:
    g = torch.Generator().manual_seed(seed)
    bank = ReferenceBank("sdxl-tiny", (16, 16), 4)
    for name, n in (("Lily", 3), ("Tom", 5)):
        for layer in LAYERS:
            for step in (1, 2, 3):
                bank.add(name, layer, step, torch.randn(n + step, 8, generator=g).to(dtype),
                         torch.randn(n + step, 8, generator=g).to(dtype))
    return bank


def assert_same_bank(a: ReferenceBank, b: ReferenceBank) -> None:
    assert (a.backbone, tuple(a.latent_hw), a.num_steps) == (b.backbone, tuple(b.latent_hw), b.num_steps)
    assert a.characters == b.characters
    for name in a.characters:
        assert a.tokens[name].keys() == b.tokens[name].keys()
        for key, (k, v) in a.tokens[name].items():
            k2, v2 = b.tokens[name][key]
            assert k.dtype == k2.dtype and torch.equal(k, k2) and torch.equal(v, v2)


def test_add_get_contains():
    bank = make_bank()
    assert "Lily" in bank and "Tom" in bank and "Rosa" not in bank
    k, v = bank.get("Tom", LAYERS[1], 2)
    assert k.shape == v.shape == (7, 8)
    assert bank.get("Tom", LAYERS[1], 0) is None
    assert bank.get("Rosa", LAYERS[0], 1) is None


def test_add_detaches_and_moves_to_cpu():
    bank = ReferenceBank("sdxl-tiny", (16, 16), 4)
    k = torch.randn(2, 4, requires_grad=True)
    bank.add("Lily", LAYERS[0], 1, k, k * 2)
    stored_k, stored_v = bank.get("Lily", LAYERS[0], 1)
    assert not stored_k.requires_grad and stored_k.device.type == "cpu"
    assert torch.equal(stored_v, (k * 2).detach())


def test_bank_keeps_its_tokens_on_its_device():
    bank = make_bank().to("meta")  # "meta": a device other than the CPU, on any machine
    assert bank.device.type == "meta"
    assert all(k.is_meta and v.is_meta for entries in bank.tokens.values() for k, v in entries.values())
    bank.add("Rosa", LAYERS[0], 1, torch.randn(2, 8), torch.randn(2, 8))
    assert bank.get("Rosa", LAYERS[0], 1)[0].is_meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_roundtrip(tmp_path, dtype):
    bank = make_bank(dtype=dtype)
    path = bank.save(tmp_path / "bank.safetensors")
    assert path == tmp_path / "bank.safetensors" and path.exists()
    loaded = ReferenceBank.load(path)
    assert_same_bank(bank, loaded)
    assert loaded.nbytes() == bank.nbytes()


def test_nbytes():
    bank = make_bank()
    # Lily: n = 3 + step rows of 8 float32, keys and values, two layers
    lily = sum(2 * (3 + s) * 8 * 4 for s in (1, 2, 3)) * len(LAYERS)
    tom = sum(2 * (5 + s) * 8 * 4 for s in (1, 2, 3)) * len(LAYERS)
    assert bank.nbytes("Lily") == lily
    assert bank.nbytes("Tom") == tom
    assert bank.nbytes() == lily + tom
    assert make_bank(dtype=torch.float16).nbytes() == (lily + tom) // 2
    assert ReferenceBank("sdxl-tiny", (16, 16), 4).nbytes() == 0


def test_name_with_separator_rejected(tmp_path):
    bank = ReferenceBank("sdxl-tiny", (16, 16), 4)
    with pytest.raises(BankError, match=r"'a\|b'"):
        bank.add("a|b", LAYERS[0], 1, torch.zeros(1, 2), torch.zeros(1, 2))
    assert "a|b" not in bank


def test_load_missing_file(tmp_path):
    with pytest.raises(BankError, match="no reference bank"):
        ReferenceBank.load(tmp_path / "nothing.safetensors")


def test_load_truncated_file(tmp_path):
    path = make_bank().save(tmp_path / "bank.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match="damaged") as info:
        ReferenceBank.load(path)
    assert str(path) in str(info.value)


def test_load_random_bytes(tmp_path):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(os.urandom(1000))
    with pytest.raises(BankError, match="cannot read reference bank"):
        ReferenceBank.load(path)


def test_load_safetensors_that_is_not_a_bank(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(BankError, match="not a bank saved by ReferenceBank.save"):
        ReferenceBank.load(path)


def test_load_other_format_version(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "future.safetensors"
    header = {"version": BANK_FORMAT_VERSION + 1, "backbone": "sdxl-tiny", "latent_hw": [16, 16],
              "num_steps": 4, "characters": [], "index": []}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"osa_bank": json.dumps(header)})
    with pytest.raises(BankError, match=f"version {BANK_FORMAT_VERSION + 1}"):
        ReferenceBank.load(path)


def test_check_compatible():
    bank = make_bank()
    bank.check_compatible("sdxl-tiny", (16, 16), 4)  # its own settings: fine
    with pytest.raises(BankError, match="backbone 'sdxl-tiny'.*'toy'"):
        bank.check_compatible("toy", (16, 16), 4)
    with pytest.raises(BankError, match="4 denoising steps, this run uses 25"):
        bank.check_compatible("sdxl-tiny", (16, 16), 25)
    with pytest.raises(BankError, match=r"latent size \(16, 16\) != \(32, 32\)"):
        bank.check_compatible("sdxl-tiny", (32, 32), 4)
    with pytest.raises(BankError) as info:  # every problem at once
        bank.check_compatible("toy", (32, 32), 25)
    assert "backbone" in str(info.value) and "steps" in str(info.value) and "latent" in str(info.value)


def test_loaded_bank_keeps_compatibility_settings(tmp_path):
    loaded = ReferenceBank.load(make_bank().save(tmp_path / "b.safetensors"))
    loaded.check_compatible("sdxl-tiny", (16, 16), 4)
    with pytest.raises(BankError):
        loaded.check_compatible("sdxl", (16, 16), 4)


def test_save_leaves_no_temporary_file(tmp_path):
    make_bank().save(tmp_path / "bank.safetensors")
    make_bank(seed=1).save(tmp_path / "bank.safetensors")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]
    assert_same_bank(ReferenceBank.load(tmp_path / "bank.safetensors"), make_bank(seed=1))


def test_failed_save_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    import safetensors.torch
    path = tmp_path / "bank.safetensors"
    old = make_bank(seed=0)
    old.save(path)
    old_bytes = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial write, then the disk fills up
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space left"):
        make_bank(seed=1).save(path)
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]  # no *.tmp left
    monkeypatch.undo()
    assert_same_bank(ReferenceBank.load(path), old)


def test_empty_bank_roundtrip(tmp_path):
    empty = ReferenceBank("sdxl-tiny", (16, 16), 4)
    loaded = ReferenceBank.load(empty.save(tmp_path / "empty.safetensors"))
    assert_same_bank(empty, loaded)
    assert loaded.characters == []


# --- banks that check what they hold (issue 15) ---------------------------------------------------
def rewrite_header(path, change) -> None:
    """Save the file again with its header changed by ``change(header)`` (tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["osa_bank"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(header, tensors)
    save_file(tensors, str(path), metadata={"osa_bank": json.dumps(header)})


def test_changed_tensor_bytes_fail_the_checksum(tmp_path):
    path = make_bank().save(tmp_path / "bank.safetensors")
    rewrite_header(path, lambda header, tensors: tensors["Lily|0|k"].add_(1e-3))
    with pytest.raises(BankError, match="does not match the sha256 checksum"):
        ReferenceBank.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda h, t: h["index"].append(["Lily", 99, LAYERS[0], 1]), r"names the tensor Lily\|99\|'k', which the file"),
    (lambda h, t: h.pop("sha256"), r"header field 'sha256' is None, expected a str"),
    (lambda h, t: h.update(num_steps="4"), r"header field 'num_steps' is '4', expected a int"),
    (lambda h, t: h.update(latent_hw=[16]), r"'latent_hw' is \[16\], expected two positive integers"),
    (lambda h, t: h.update(characters=["Lily"]), r"'characters' \['Lily'\] does not match"),
    (lambda h, t: h["identities"].update(Tom=["a boy"]), r"'identities' has \['a boy'\] for 'Tom'"),
    (lambda h, t: h.update(version=2), r"format version 2; this library reads version 3 \(older files do not say which weights"),
    (lambda h, t: h.update(drawn={"weights": "abc"}), r"header field 'drawn' is \{'weights': 'abc'\}, expected null or"),
])
def test_every_header_field_is_checked(tmp_path, change, message):
    bank = make_bank()
    bank.set_identity("Tom", "a boy with black hair", "boy")
    path = bank.save(tmp_path / "bank.safetensors")
    rewrite_header(path, change)
    with pytest.raises(BankError, match=message):
        ReferenceBank.load(path)


def test_identities_round_trip_and_a_mismatch_names_both(tmp_path):
    bank = make_bank()
    bank.set_identity("Lily", "a girl with blonde hair", "girl")
    loaded = ReferenceBank.load(bank.save(tmp_path / "bank.safetensors"))
    assert loaded.identities == {"Lily": {"id_prompt": "a girl with blonde hair", "word": "girl"}}
    loaded.check_identity("Lily", "a girl with blonde hair", "girl")
    with pytest.raises(BankError, match="'Lily' in the reference bank was drawn as id_prompt 'a girl with "
                                        "blonde hair', word 'girl'; the story defines id_prompt 'a boy', word 'boy'"):
        loaded.check_identity("Lily", "a boy", "boy")


@pytest.mark.parametrize("name", ["a|b", "tab\there", "", 3])
def test_names_the_bank_keys_cannot_hold_are_refused(name):
    with pytest.raises(BankError, match="character name"):
        ReferenceBank("sdxl-tiny", (16, 16), 4).set_identity(name, "a girl", "girl")


def test_temporary_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path, monkeypatch):
    import safetensors.torch
    path = tmp_path / "bank.safetensors"

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        make_bank().save(path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / ".bank.safetensors.tmp").write_bytes(b"left by a save killed with SIGKILL")
    make_bank().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_save_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(BankError, match=r"the folder .*missing does not exist. Create it first"):
        make_bank().save(tmp_path / "missing" / "bank.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- a bank knows the weights and the scheduler that drew it --------------------------------------
def test_fingerprint_follows_the_key_and_value_weights_not_their_dtype(tiny):
    unet = tiny.unet
    before = weights_fingerprint(unet)
    assert len(before) == 16 and weights_fingerprint(unet) == before
    half = copy.deepcopy(unet).to(torch.float16)  # the same checkpoint in fp16
    assert weights_fingerprint(half) == before
    changed = copy.deepcopy(unet)
    attn1 = changed.up_blocks[0].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        attn1.to_v.weight.mul_(1.01)  # a fine-tune of one value projection
    assert weights_fingerprint(changed) != before
    other_config = copy.deepcopy(unet)
    other_config.register_to_config(sample_size=32)
    assert weights_fingerprint(other_config) != before


def test_other_weights_and_schedulers_are_refused_naming_both(tiny, tmp_path):
    drawn = drawn_with(tiny, 4)
    assert drawn["scheduler"]["name"] == "EulerDiscreteScheduler" and len(drawn["scheduler"]["timesteps"]) == 4
    bank = make_bank()
    bank.drawn = drawn
    loaded = ReferenceBank.load(bank.save(tmp_path / "b.safetensors"))
    assert loaded.drawn == drawn
    loaded.check_compatible("sdxl-tiny", (16, 16), 4, drawn)  # what drew it: fine
    other = copy.deepcopy(drawn)
    other["weights"] = {"fingerprint": "0123456789abcdef", "source": "model_id my-finetune"}
    with pytest.raises(BankError, match=rf"other U-Net weights \(sdxl-tiny, fingerprint {drawn['weights']['fingerprint']}\) "
                                        r"than this run's \(model_id my-finetune, fingerprint 0123456789abcdef\)"):
        loaded.check_compatible("sdxl-tiny", (16, 16), 4, other)
    other = copy.deepcopy(drawn)
    other["scheduler"]["name"] = "EulerAncestralDiscreteScheduler"
    with pytest.raises(BankError, match="scheduler EulerDiscreteScheduler, this run uses EulerAncestralDiscreteScheduler"):
        loaded.check_compatible("sdxl-tiny", (16, 16), 4, other)
    other = copy.deepcopy(drawn)
    other["scheduler"]["timesteps"] = [t + 1 for t in other["scheduler"]["timesteps"]]
    with pytest.raises(BankError, match="timesteps .* differ from this run's"):
        loaded.check_compatible("sdxl-tiny", (16, 16), 4, other)
    make_bank().check_compatible("sdxl-tiny", (16, 16), 4, other)  # a bank made by hand knows nothing: not checked

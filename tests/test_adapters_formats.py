"""LoRA files: exact round trips, precision, addnet hashes, damaged files, atomic writes, ModelSpec."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from datetime import datetime

import pytest
import safetensors.torch
import torch

from lorakit import __version__
from lorakit.adapters.formats import (
    file_hashes_for_base_model,
    load_lora_file,
    lora_file_name,
    save_lora_file,
    state_dir_name,
)
from lorakit.adapters.modelspec import build_modelspec, default_title
from lorakit.errors import CheckpointError, ConfigError


def lora_state_dict(rank: int = 4, width: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, width, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(width, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.randn(rank, 8, 3, 3, generator=g)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] = torch.randn(8, rank, 1, 1, generator=g)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] = torch.tensor(1.0)
    return sd


def header_of(path) -> tuple[int, dict]:
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


SS_META = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_network_module": "networks.lora"}


@pytest.mark.parametrize("model_format", ["safetensors", "ckpt", "pt"])
def test_round_trip_is_bit_exact(tmp_path, model_format):
    sd = lora_state_dict()
    meta = dict(SS_META, **{"modelspec.title": "demo"})
    path = tmp_path / f"my_lora.{model_format}"
    written = save_lora_file(sd, path, meta, model_format=model_format)
    loaded, loaded_meta = load_lora_file(path)
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert loaded["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].shape == ()
    if model_format == "safetensors":
        assert loaded_meta == written
        assert {k: loaded_meta[k] for k in meta} == meta
        assert {"sshs_model_hash", "sshs_legacy_hash"} <= set(loaded_meta)
    else:
        assert loaded_meta == {} and written == {}
    assert os.listdir(tmp_path) == [path.name]


def test_save_precision_casts_everything(tmp_path):
    sd = lora_state_dict()
    path = tmp_path / "half.safetensors"
    save_lora_file(sd, path, SS_META, save_dtype=torch.float16)
    loaded, _ = load_lora_file(path)
    assert {v.dtype for v in loaded.values()} == {torch.float16}  # the .alpha scalars too, as sd-scripts
    for key, value in sd.items():
        assert torch.equal(loaded[key], value.to(torch.float16))
    # the caller's tensors are untouched
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_non_contiguous_and_grad_tensors_are_saved(tmp_path):
    weight = torch.randn(6, 4, requires_grad=True)
    sd = {"lora_unet_x.lora_up.weight": weight, "lora_unet_x.lora_down.weight": torch.randn(4, 6).t()}
    path = tmp_path / "nc.safetensors"
    save_lora_file(sd, path, None)
    loaded, _ = load_lora_file(path)
    assert torch.equal(loaded["lora_unet_x.lora_down.weight"], sd["lora_unet_x.lora_down.weight"])
    assert torch.equal(loaded["lora_unet_x.lora_up.weight"], weight.detach())


def test_addnet_hashes_match_independent_recomputation(tmp_path):
    # > 1 MiB of tensor data so the legacy window (64 KiB at 1 MiB) lies inside the file
    sd = lora_state_dict(rank=24, width=4096)
    path = tmp_path / "big.safetensors"
    meta = dict(SS_META, **{"modelspec.title": "first", "modelspec.author": "a"})
    written = save_lora_file(sd, path, meta)

    # model hash: the tensor-data section of the file actually written (its header is different)
    raw = path.read_bytes()
    length, header = header_of(path)
    assert hashlib.sha256(raw[8 + length :]).hexdigest() == written["sshs_model_hash"]
    assert header["__metadata__"]["sshs_model_hash"] == written["sshs_model_hash"]
    assert len(raw) > 0x110000

    # legacy hash: the same window of a serialisation that carries only the ss_* keys
    ss_only = safetensors.torch.save(sd, metadata=SS_META)
    assert hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8] == written["sshs_legacy_hash"]

    # other metadata does not change either hash; ss_* metadata changes only the legacy one
    other = save_lora_file(sd, tmp_path / "b.safetensors", dict(SS_META, **{"modelspec.title": "a much longer title"}))
    assert (other["sshs_model_hash"], other["sshs_legacy_hash"]) == (written["sshs_model_hash"], written["sshs_legacy_hash"])
    more_ss = save_lora_file(sd, tmp_path / "c.safetensors", dict(SS_META, ss_training_comment="x" * 100))
    assert more_ss["sshs_model_hash"] == written["sshs_model_hash"]
    assert more_ss["sshs_legacy_hash"] != written["sshs_legacy_hash"]

    # and the weights do change it
    sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] = torch.tensor(2.0)
    changed = save_lora_file(sd, tmp_path / "d.safetensors", meta)
    assert changed["sshs_model_hash"] != written["sshs_model_hash"]


def test_base_model_hashes(tmp_path):
    data = os.urandom(0x100000 + 0x18000)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    hashes = file_hashes_for_base_model(path)
    assert hashes == {
        "legacy": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        file_hashes_for_base_model(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("model_format", ["safetensors", "ckpt"])
def test_truncated_file_names_the_file(tmp_path, model_format):
    path = tmp_path / f"cut.{model_format}"
    save_lora_file(lora_state_dict(), path, SS_META, model_format=model_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut." + model_format):
        load_lora_file(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="cut." + model_format):
        load_lora_file(path)


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.safetensors"):
        load_lora_file(tmp_path / "nothing.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        load_lora_file(empty)
    png = tmp_path / "picture.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="picture.safetensors"):
        load_lora_file(png)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(CheckpointError, match="list.pt"):
        load_lora_file(not_a_state_dict)


def test_failed_saves_leave_no_file(tmp_path):
    good = lora_state_dict()
    # a tensor with no data cannot be serialised
    with pytest.raises(ValueError, match="meta"):
        save_lora_file(dict(good, **{"lora_unet_x.alpha": torch.empty((), device="meta")}), tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="lora_unet_x.alpha"):
        save_lora_file(dict(good, **{"lora_unet_x.alpha": 1.0}), tmp_path / "a.ckpt", model_format="ckpt")
    assert os.listdir(tmp_path) == []
    # the final rename fails after the data was written: the temporary file must go
    blocker = tmp_path / "taken.safetensors"
    blocker.mkdir()
    (blocker / "inside").write_text("x")
    with pytest.raises(CheckpointError, match="taken.safetensors"):
        save_lora_file(good, blocker, SS_META)
    assert sorted(os.listdir(tmp_path)) == ["taken.safetensors"]
    # a folder that does not exist
    with pytest.raises(CheckpointError, match="no_such_dir"):
        save_lora_file(good, tmp_path / "no_such_dir" / "x.safetensors", SS_META)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="x.safetensors"):
            save_lora_file(lora_state_dict(), folder / "x.safetensors", SS_META)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_existing_file_is_replaced_whole(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora_file(lora_state_dict(seed=1), path, SS_META)
    save_lora_file(lora_state_dict(seed=2), path, SS_META)
    loaded, _ = load_lora_file(path)
    assert torch.equal(loaded["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"],
                       lora_state_dict(seed=2)["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"])
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_file_names():
    assert lora_file_name("mylora", "safetensors", epoch=4) == "mylora-000004.safetensors"
    assert lora_file_name("mylora", "ckpt", step=1500) == "mylora-step00001500.ckpt"
    assert lora_file_name("mylora", ".pt") == "mylora.pt"
    assert lora_file_name(None, "safetensors", epoch=2) == "epoch-000002.safetensors"
    assert lora_file_name(None, "safetensors", step=7) == "at-step00000007.safetensors"
    assert lora_file_name(None, "safetensors") == "last.safetensors"
    assert state_dir_name("mylora", epoch=3) == "mylora-000003-state"
    assert state_dir_name(None, step=10) == "at-step00000010-state"
    assert state_dir_name(None) == "last-state"


# ---------------------------------------------------------------------- ModelSpec


def test_modelspec_keys():
    when = datetime(2024, 5, 6, 7, 8, 9)
    spec = build_modelspec(
        "stable-diffusion-xl-v1-base",
        "https://github.com/Stability-AI/generative-models",
        "my style",
        (1024, 768),
        "epsilon",
        clip_skip=2,
        timestep_range=(0, 900),
        extra={"author": "me", "metadata_tags": "a,b", "trigger_phrase": "sks"},
        date=when,
    )
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "my style",
        "modelspec.resolution": "1024x768",
        "modelspec.date": "2024-05-06T07:08:09",
        "modelspec.prediction_type": "epsilon",
        "modelspec.timestep_range": "0,900",
        "modelspec.encoder_layer": "2",
        "modelspec.implementation_version": f"lorakit/{__version__}",
        "modelspec.author": "me",
        "modelspec.tags": "a,b",
        "modelspec.trigger_phrase": "sks",
    }
    flux = build_modelspec("flux-1-dev", "https://github.com/black-forest-labs/flux", "f", 512, None, extra={})
    assert flux["modelspec.architecture"] == "flux-1-dev/lora" and flux["modelspec.resolution"] == "512x512"
    assert "modelspec.prediction_type" not in flux and "modelspec.encoder_layer" not in flux
    already = build_modelspec("stable-diffusion-v1/lora", "diffusers", "t", 512, "v")
    assert already["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_modelspec_thumbnail_and_bad_keys(tmp_path):
    image = tmp_path / "thumb.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nfake-but-bytes")
    spec = build_modelspec("stable-diffusion-v1", "diffusers", "t", 512, "epsilon", extra={"thumbnail": str(image)})
    url = spec["modelspec.thumbnail"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image.read_bytes()
    kept = build_modelspec("stable-diffusion-v1", "diffusers", "t", 512, "epsilon", extra={"thumbnail": "data:image/png;base64,AA=="})
    assert kept["modelspec.thumbnail"] == "data:image/png;base64,AA=="
    with pytest.raises(ConfigError, match="missing.png"):
        build_modelspec("stable-diffusion-v1", "diffusers", "t", 512, "epsilon", extra={"thumbnail": str(tmp_path / "missing.png")})
    with pytest.raises(ConfigError, match="did you mean metadata_author"):
        build_modelspec("stable-diffusion-v1", "diffusers", "t", 512, "epsilon", extra={"metadata_autor": "x"})


def test_default_title():
    assert default_title("out", "Title") == "Title"
    assert default_title("out") == "out"
    assert default_title(None, None, datetime.fromtimestamp(1700000000)) == "LoRA@1700000000"


def test_network_file_network_round_trip(tmp_path):
    from torch import nn

    from lorakit.adapters.network import LoRANetwork
    from lorakit.adapters.targets import AdapterTarget

    torch.manual_seed(0)
    layers = [nn.Linear(6, 5), nn.Conv2d(3, 4, 3, padding=1)]

    def build() -> LoRANetwork:
        return LoRANetwork(
            [AdapterTarget("lora_te_fc", layers[0], "text_encoder", 2, 1.0), AdapterTarget("lora_unet_conv", layers[1], "unet", 2, 4.0)]
        )

    trained = build()
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    path = tmp_path / "net.safetensors"
    save_lora_file(trained.state_dict_kohya(), path, SS_META)
    tensors, _ = load_lora_file(path)
    fresh = build()
    assert fresh.load_kohya_state_dict(tensors, source=str(path)) == []
    for name, module in fresh.lora_modules.items():
        assert torch.equal(module.delta_weight(), trained.lora_modules[name].delta_weight())
    assert fresh.lora_modules["lora_unet_conv"].scale == 2.0


def test_safetensors_whose_header_length_starts_with_byte_0x80_is_read_as_safetensors(tmp_path):
    """The 8-byte header length can start with 0x80 (pickle's PROTO opcode); such a file keeps its metadata."""
    import safetensors.torch

    from lorakit.adapters.formats import load_lora_file

    path = tmp_path / "lora.safetensors"
    for pad in range(300):
        safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path), metadata={"ss_note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, metadata = load_lora_file(path)
    assert metadata["ss_note"].startswith("x") and tensors["lora_unet_x.lora_down.weight"].shape == (2, 3)


def test_base_model_hashes_are_computed_beside_training(tmp_path, monkeypatch):
    """The whole-file hash runs in its own thread from the start of the run and is read at the first save."""
    import threading
    from types import SimpleNamespace

    from lorakit.training import metadata
    from lorakit.training.metadata import BaseModelHashes

    threads: list[str] = []
    hash_file = metadata.base_model_hashes

    def recording(path, kind):
        thread = threading.current_thread()
        threads.append(thread.name if thread.daemon else "not a daemon: a stopped run would wait for it")
        return hash_file(path, kind)

    monkeypatch.setattr(metadata, "base_model_hashes", recording)

    data = os.urandom(0x100000 + 0x18000)
    model, vae = tmp_path / "model.safetensors", tmp_path / "vae.safetensors"
    model.write_bytes(data)
    vae.write_bytes(data[::-1])
    cfg = SimpleNamespace(pretrained_model_name_or_path=str(model), vae=str(vae), no_metadata=False)
    result = BaseModelHashes(cfg).result()
    assert result == {
        "ss_sd_model_name": "model.safetensors", "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest(),
        "ss_vae_name": "vae.safetensors", "ss_vae_hash": file_hashes_for_base_model(vae)["legacy"],
        "ss_new_vae_hash": hashlib.sha256(data[::-1]).hexdigest(),
    }
    assert len(threads) == 2 and all(name.startswith("lorakit-model-hash") for name in threads)  # not the caller's
    # --no_metadata reads nothing; a folder model has a name but no file hash
    assert BaseModelHashes(SimpleNamespace(pretrained_model_name_or_path=str(model), vae=None, no_metadata=True)).result() == {}
    folder = BaseModelHashes(SimpleNamespace(pretrained_model_name_or_path=str(tmp_path), vae=None, no_metadata=False))
    assert folder.result() == {"ss_sd_model_name": tmp_path.name}
    missing = BaseModelHashes(SimpleNamespace(pretrained_model_name_or_path=str(tmp_path / "gone"), vae=None, no_metadata=False))
    assert missing.result() == {"ss_sd_model_name": "gone"}

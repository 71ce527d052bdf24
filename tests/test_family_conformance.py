"""Every registered family through the whole `ModelFamily` protocol, on its tiny model (`families/<name>/tiny.py`).

A new family passes these tests by implementing `families/base.py` in its folder and adding its registry line;
nothing here names a family.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import write_dreambooth_folder
from lorakit.adapters.algorithms import available_modules
from lorakit.adapters.key_layout import KeyLayout
from lorakit.cli.main import main
from lorakit.data.latent_files import LatentFileFormat
from lorakit.data.text_files import TextFileFormat
from lorakit.families.base import ModelFamily, ModelSource
from lorakit.families.registry import all_families, detect_family, family_names, fixtures, get_family, guess_lora_family
from lorakit.tools.common import load_lora
from lorakit.tools.convert import convert_to_diffusers
from lorakit.tools.models import load_base_model
from lorakit.tools.targets import model_targets

NAMES = family_names()
_TRAINED: dict[str, dict] = {}


def _required_members() -> list[str]:
    """The members `ModelFamily` leaves to each family (their base body raises NotImplementedError)."""
    required = []
    for name, member in inspect.getmembers(ModelFamily):
        function = member.fget if isinstance(member, property) else member
        if callable(function) and not name.startswith("_"):
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):
                continue
            if source.rstrip().endswith("raise NotImplementedError"):
                required.append(name)
    return required


def test_the_protocol_has_required_members():
    assert {"load", "load_model", "adapter_targets", "encode_text", "predict", "metadata", "base_model",
            "owns_checkpoint", "latent_format", "text_cache_format", "text_encoder_outputs", "lora_layout", "save_single_file",
            "save_folder"} <= set(_required_members())


@pytest.mark.parametrize("name", NAMES)
def test_family_implements_the_protocol(name):
    family = get_family(name)
    assert family.name == name and family.title
    missing = [m for m in _required_members() if getattr(type(family), m) is getattr(ModelFamily, m)]
    assert not missing, f"{name} does not define {missing}"
    assert isinstance(family.latent_format, LatentFileFormat) and isinstance(family.lora_layout, KeyLayout)
    assert isinstance(family.text_cache_format, TextFileFormat) and family.text_cache_format.keys
    assert family.default_network_module in available_modules(family)
    assert family.single_file_kinds and family.save_formats[0] == "kohya" and family.lora_hints
    default = family.base_model(None)
    assert default.architecture and default.implementation and default.resolution > 0
    assert family.base_model(default.version).version == default.version


def test_families_keep_their_files_apart():
    families = all_families()
    for attribute in ("title",):
        values = [getattr(f, attribute) for f in families]
        assert len(set(values)) == len(values), attribute
    suffixes = [f.latent_format.suffix for f in families] + [f.text_cache_format.suffix for f in families]
    assert len(set(suffixes)) == len(suffixes), suffixes


def _trained(name: str, root: Path) -> dict:
    """The family's tiny model files and a LoRA trained on them for two steps (made once per family)."""
    if name not in _TRAINED:
        args, _ = fixtures(name).bench_files("tiny", root / "model")
        data = write_dreambooth_folder(root / "data", count=2, repeats=1)
        out = root / "out"
        argv = ["train", f"--family={name}", *args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={out}",
                "--output_name=tiny", "--network_dim=4", "--network_alpha=2", "--max_train_steps=2",
                "--learning_rate=1e-3", "--seed=3", "--max_data_loader_n_workers=0"]
        assert main(argv) == 0
        options = dict(a[2:].split("=", 1) for a in args)
        _TRAINED[name] = {"model": options.pop("pretrained_model_name_or_path"), "parts": options,
                          "lora": out / "tiny.safetensors"}
    return _TRAINED[name]


@pytest.mark.parametrize("name", NAMES)
def test_family_detects_its_own_model_only(name, tmp_path_factory):
    model = _trained(name, tmp_path_factory.mktemp(name))["model"]
    assert detect_family(model) == name
    assert get_family(name).owns_checkpoint(model)
    fallback = NAMES[-1]
    assert not [other for other in NAMES if other not in (name, fallback) and get_family(other).owns_checkpoint(model)]


@pytest.mark.parametrize("name", NAMES)
def test_trained_file_is_read_back_as_the_family_writes_it(name, tmp_path_factory):
    trained = _trained(name, tmp_path_factory.mktemp(name))
    family = get_family(name)
    with safe_open(str(trained["lora"]), framework="pt") as f:
        modules = {k.partition(".")[0] for k in f.keys()}
        metadata = f.metadata()
    assert guess_lora_family(list(modules), metadata) == name
    by_names = guess_lora_family(list(modules))
    # names alone tell the family, unless another family's files use the very same names (a family whose kohya
    # names are a subset of another's): that family must then read every module, and the metadata decides
    assert by_names == name or all(get_family(by_names).lora_layout.kohya_to_path(m) is not None for m in modules), by_names
    architecture = metadata["modelspec.architecture"].split("/")[0]
    facts = family.base_model(metadata["ss_base_model_version"], variant=family.variant_of_architecture(architecture))
    assert architecture == facts.architecture and metadata["modelspec.implementation"] == facts.implementation
    assert metadata.get("modelspec.prediction_type") == facts.prediction_type
    lora = load_lora(trained["lora"])
    assert lora.family.name == name and lora.modules.keys() == modules
    assert all(family.lora_layout.kohya_to_path(m) is not None for m in modules)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_layout_round_trip_keeps_every_delta(name, tmp_path_factory, tmp_path):
    from lorakit.adapters.formats import save_lora_file

    trained = _trained(name, tmp_path_factory.mktemp(name))
    lora = load_lora(trained["lora"])
    state, metadata = convert_to_diffusers(lora.modules, lora.family, lora.metadata)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    save_lora_file(state, tmp_path / "peft.safetensors", metadata)
    back = load_lora(tmp_path / "peft.safetensors")
    assert back.family.name == name and back.modules.keys() == lora.modules.keys()
    for module_name, module in lora.modules.items():
        torch.testing.assert_close(back.modules[module_name].delta(), module.delta(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_every_trained_module_is_a_layer_the_tools_merge_into(name, tmp_path_factory, tmp_path):
    trained = _trained(name, tmp_path_factory.mktemp(name))
    family = get_family(name)
    comps = load_base_model(trained["model"], family=family, files=trained["parts"])
    with model_targets(family, comps) as targets:
        names = set(targets)
    assert load_lora(trained["lora"]).modules.keys() <= names
    # the whole model written back in its single-file layout loads with the same denoiser weights
    kind = family.single_file_kinds[0]
    out = tmp_path / f"model.{kind}"
    family.save_single_file(comps, out, kind)
    again = family.load_model(ModelSource(str(out), partial=True))
    before, after = comps.denoiser.state_dict(), again.denoiser.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

"""--base_quant: quantized frozen weights (families/common/quant.py) on every family's tiny model.

Each mode trains a LoRA; one SGD step makes the file's ΔW proportional to the gradient, so its distance from the
same run on the unquantized base measures what the quantization changed, and is bounded by a multiple of the
mode's own weight error. A trained file merged into a quantized base gives W' = dequant(W) + ΔW exactly, and the
merged model saves and loads as a plain model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.families.base import ModelSource
from lorakit.families.common.quant import MODES, is_quantized, quantize, relative_weight_error
from lorakit.families.registry import family_names, fixtures, get_family

NAMES = family_names()
# the ΔW of one SGD step moves by at most this many times the relative weight error (errors compound through
# the blocks; measured factors on the tiny models are 2 to 12); the runs compute in bf16, whose own rounding of
# the weights (2^-9 relative) is in both runs' error
ERROR_GROWTH = 10.0
BF16_ROUNDING = 2.0**-9


def _train(name: str, root: Path, model_args: list[str], mode: str | None, *extra: str) -> dict[str, torch.Tensor]:
    from accelerate.state import AcceleratorState

    data = root / "data"
    if not data.exists():
        write_dreambooth_folder(data, count=2, repeats=1)
    out = root / f"out_{mode}"
    argv = ["train", f"--family={name}", *model_args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={out}",
            "--output_name=tiny", "--network_dim=4", "--network_alpha=4", "--max_train_steps=1", "--optimizer_type=SGD",
            "--learning_rate=1e-2", "--seed=3", "--mixed_precision=bf16", "--max_data_loader_n_workers=0", *extra]
    assert main(argv + ([f"--base_quant={mode}"] if mode else [])) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    return load_file(out / "tiny.safetensors")


def _delta(state: dict[str, torch.Tensor], up: str) -> torch.Tensor:
    return state[up].float().flatten(1) @ state[up.replace("lora_up", "lora_down")].float().flatten(1)


@pytest.mark.parametrize("name", NAMES)
def test_every_mode_trains_a_lora_close_to_the_unquantized_base(name, tmp_path):
    model_args, _ = fixtures(name).bench_files("tiny", tmp_path / "model")
    reference = _train(name, tmp_path, model_args, None)
    ups = [k for k in reference if k.endswith("lora_up.weight")]
    denoiser = get_family(name).load_model(_source(model_args)).denoiser
    for mode in MODES:
        state = _train(name, tmp_path, model_args, mode)
        assert state.keys() == reference.keys(), mode
        moved = sum(float((_delta(state, k) - _delta(reference, k)).norm() ** 2) for k in ups) ** 0.5
        size = sum(float(_delta(reference, k).norm() ** 2) for k in ups) ** 0.5
        bound = ERROR_GROWTH * (relative_weight_error(denoiser, mode) + BF16_ROUNDING)
        assert 0 < moved / size < bound, f"{name} {mode}: ΔW moved {moved / size:.3f} of its size (bound {bound:.3f})"


def _source(model_args: list[str], **kwargs) -> ModelSource:
    options = dict(a[2:].split("=", 1) for a in model_args)
    path = options.pop("pretrained_model_name_or_path")
    return ModelSource(path, {k: v for k, v in options.items() if k != "family"}, **kwargs)


@pytest.mark.parametrize("index,name", list(enumerate(NAMES)))
def test_a_lora_merged_into_a_quantized_base_dequantizes_and_saves(index, name, tmp_path):
    """Every family with one mode each (all modes are covered across the families)."""
    from lorakit.config import parse_train_args
    from lorakit.training.run import make_accelerator
    from lorakit.training.setup import setup_session

    mode = MODES[index % len(MODES)]
    family = get_family(name)
    model_args, _ = fixtures(name).bench_files("tiny", tmp_path / "model")
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    cfg, _ = parse_train_args([*model_args, f"--family={name}", f"--train_data_dir={data}", "--resolution=64",
                               f"--output_dir={tmp_path / 'unused'}", f"--base_quant={mode}", "--mixed_precision=bf16",
                               "--network_dim=4", "--network_alpha=4"])
    session = setup_session(cfg, family, make_accelerator(cfg))
    network = session.trainable.network
    torch.manual_seed(0)
    with torch.no_grad():  # a trained LoRA's stand-in: every factor random (a fresh LoRA's up factors are zero)
        for parameter in network.trainable_parameters():
            parameter.normal_(0, 0.05)
    assert network.lora_modules
    expected = {n: m.merged_weight(1.0).float() for n, m in network.lora_modules.items()}
    quantized_before = sum(is_quantized(m) for m in session.comps.denoiser.modules())
    assert quantized_before or mode == "fp8"
    network.merge_to_base()
    # fp8 (--fp8_base) writes W' back in float8 as it always did (e4m3 rounds to 1/16 relative, 2^-10 absolute in
    # its subnormals); the other modes hold W' dequantized in the compute dtype, bf16 here
    rtol, atol = (2**-4, 2**-10) if mode == "fp8" else (2**-8, 1e-5)
    for module_name, module in network.lora_modules.items():
        torch.testing.assert_close(module.org_module.weight.float(), expected[module_name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name} {mode} {module_name}: {m}")
    # the merged model is written as a plain model and reads back with the merged weights
    kind = family.single_file_kinds[0]
    out = tmp_path / f"merged.{kind}"
    family.save_single_file(session.comps, out, kind)
    again = family.load_model(ModelSource(str(out), partial=True)).denoiser.state_dict()
    saved = session.comps.denoiser.state_dict()
    assert saved.keys() == again.keys()
    for key, value in saved.items():
        torch.testing.assert_close(again[key].float(), value.float(), rtol=1e-2, atol=1e-2, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("mode", MODES[1:])
def test_a_quantized_layer_keeps_its_codes_and_round_trips_its_state(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 4, 3, padding=1))
    x = torch.randn(3, 64, requires_grad=True)
    reference = model(x)
    reference.square().sum().backward()
    grad = x.grad.clone()
    quantized = copy.deepcopy(model)
    assert quantize(quantized, mode) == 3
    codes = quantized[0]._parameters["weight"]
    quantized.to(dtype=torch.bfloat16)
    assert quantized[0]._parameters["weight"] is codes and codes.dtype != torch.bfloat16  # a cast leaves the codes alone
    assert quantized[0].weight.dtype == torch.bfloat16  # and W is dequantized in the new compute dtype
    x.grad = None
    out = quantized(x.bfloat16())
    out.float().square().sum().backward()
    error = relative_weight_error(model, mode)
    assert float((out.float() - reference).detach().norm() / reference.detach().norm()) < 3 * error + 0.02
    assert float((x.grad - grad).norm() / grad.norm()) < 3 * error + 0.02
    # state_dict holds W (exact float32): a plain model loads it, a quantized one quantizes it to the same codes
    state = quantized.state_dict()
    assert all(v.dtype in (torch.float32, torch.bfloat16) for v in state.values())
    again = copy.deepcopy(model)
    quantize(again, mode)
    again.load_state_dict(state)
    assert torch.equal(again[0]._parameters["weight"].view(torch.uint8), codes.view(torch.uint8))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_blocks_swap_and_free_their_device_storage(mode):
    """Block swap streams the codes as it streams plain weights: same loss and gradient, and the device holds only
    the resident blocks' codes (test_block_swap's ledger)."""
    from test_block_swap import Chain, DeviceLedger, resident_bytes

    from lorakit.families.common.block_swap import install_block_swap

    torch.manual_seed(0)
    model = Chain(6, False)
    model.blocks.requires_grad_(False)
    quantize(model.blocks, mode)
    x = torch.randn(3, 8, requires_grad=True)
    reference = model(x)
    reference.backward()
    ref_grad = model.adapter.weight.grad.clone()
    model.adapter.weight.grad = None
    swapper = install_block_swap(model, [("blocks", model.blocks, 3)], "cpu")[0]
    ledger = DeviceLedger([swapper])
    ledger.watch(model.blocks)
    with ledger.hooks():
        loss = model(x)
    loss.backward()
    assert torch.equal(loss, reference) and torch.equal(model.adapter.weight.grad, ref_grad)
    assert max(ledger.seen) == resident_bytes(swapper), ledger.seen


def test_options_name_the_mode_and_its_conflicts():
    from lorakit.config import parse_train_args
    from lorakit.errors import ConfigError

    base = ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--output_dir=o", "--resolution=64"]
    cfg, _ = parse_train_args([*base, "--base_quant=fp8", "--mixed_precision=bf16"])
    assert cfg.fp8_base and cfg.base_quant == "fp8"
    cfg, _ = parse_train_args([*base, "--fp8_base", "--mixed_precision=bf16"])
    assert cfg.base_quant == "fp8"
    with pytest.raises(ConfigError, match="--base_quant nf4 and --fp8_base exclude each other"):
        parse_train_args([*base, "--base_quant=nf4", "--fp8_base", "--mixed_precision=bf16"])


def _tiny_flux_file(tmp_path: Path) -> tuple[list[str], dict[str, torch.Tensor], dict[str, str]]:
    from lorakit.checkpoint_io import read_checkpoint

    model_args, _ = fixtures("flux").bench_files("tiny", tmp_path / "model")
    checkpoint = read_checkpoint(dict(a[2:].split("=", 1) for a in model_args)["pretrained_model_name_or_path"])
    return model_args, checkpoint.state_dict, checkpoint.metadata


def test_a_scaled_fp8_community_file_loads_as_the_model_it_stands_for(tmp_path):
    """ComfyUI's scaled-fp8 layout: float8 weights, a scale_weight each (per tensor here), a scaled_fp8 marker."""
    from safetensors.torch import save_file

    model_args, state, metadata = _tiny_flux_file(tmp_path)
    scaled = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / 448
            scaled[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            scaled[key[: -len("weight")] + "scale_input"] = torch.ones(())
        else:
            scaled[key] = value
    path = tmp_path / "flux1-scaled.safetensors"
    save_file(scaled, str(path), metadata)
    family = get_family("flux")
    plain = family.load_model(_source(model_args)).denoiser.state_dict()
    args = [a if not a.startswith("--pretrained_model_name_or_path=") else f"--pretrained_model_name_or_path={path}" for a in model_args]
    loaded = family.load_model(_source(args)).denoiser.state_dict()
    assert loaded.keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(loaded[key], value, rtol=2**-4, atol=value.abs().max().item() * 2**-9 + 1e-12)


def test_a_gguf_file_is_detected_read_and_trained_on(tmp_path):
    gguf = pytest.importorskip("gguf", reason="GGUF files are read through the gguf package (lorakit[quant])")
    from lorakit.families.registry import detect_family

    model_args, state, metadata = _tiny_flux_file(tmp_path)
    path = tmp_path / "flux1-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, value in metadata.items():
        writer.add_string(key, value)
    for key, value in state.items():
        array = value.float().numpy()
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert detect_family(str(path)) == "flux"
    args = [a if not a.startswith("--pretrained_model_name_or_path=") else f"--pretrained_model_name_or_path={path}" for a in model_args]
    family = get_family("flux")
    loaded = family.load_model(_source(args)).denoiser.state_dict()
    plain = family.load_model(_source(model_args)).denoiser.state_dict()
    for key, value in plain.items():  # Q8_0: 8 bits per weight, one scale per 32
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=value.abs().max().item() / 100 + 1e-12)
    trained = _train("flux", tmp_path, args, "int8")
    assert any(k.endswith("lora_up.weight") for k in trained)

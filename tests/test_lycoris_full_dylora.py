"""`lycoris.kohya` with `algo=full` and `algo=dylora` (`adapters/lycoris_native.py`): files LyCORIS reads.

* on a Linear with a bias, a 1x1 and a 3x3 conv: the file's tensors, loaded by LyCORIS' own loader
  (`lycoris.modules.get_module` / `make_module`, what `create_lycoris_from_weights` runs per layer), merge to
  the weight (and bias) lorakit merges; the layer's forward with the adapter equals the merged layer's; the
  package's own modules on the same layer have the same tensor names and sizes;
* DyLoRA trains the newest block of a random number of leading blocks with the earlier ones frozen;
* `lorakit train` on a tiny SD 1.5 writes the files (`diff`/`diff_b`; `lora_down`/`lora_up`/`alpha`), `--network_weights`
  reads them back, `lorakit sample` merges them, and `lorakit lora dylora` splits a DyLoRA file at its blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

pytest.importorskip("lycoris")

from helpers import write_dreambooth_folder, write_tiny_checkpoints  # noqa: E402
from lorakit.adapters.lycoris_bridge import LycorisOptions  # noqa: E402
from lorakit.adapters.lycoris_native import native_adapter  # noqa: E402
from lorakit.adapters.targets import AdapterTarget  # noqa: E402
from lorakit.cli.main import main  # noqa: E402

LAYERS = {
    "linear": lambda: nn.Linear(16, 32),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1),
    "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1),
}


def parse(*args: str, dim: int = 8, alpha: float = 4.0) -> LycorisOptions:
    return LycorisOptions.parse(dict(a.split("=", 1) for a in args), dim, alpha, None)


def adapter_on(kind: str, *args: str):
    torch.manual_seed(0)
    layer = LAYERS[kind]().requires_grad_(False)
    options = parse(*args)
    adapter = native_adapter(AdapterTarget("lycoris_x", layer, "unet", options.dim, options.alpha), options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=g))
    return layer, adapter


def x_for(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn((3, 16) if kind == "linear" else (3, 16, 6, 6), generator=g)


def lycoris_loaded(tensors: dict[str, torch.Tensor], layer: nn.Module):
    from lycoris.modules import get_module, make_module

    kind_of, params = get_module({f"lycoris_x.{k}": v for k, v in tensors.items()}, "lycoris_x")
    return make_module(kind_of, params, "lycoris_x", layer)


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding)
    return F.linear(x, weight, bias)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_full_file_merges_in_lycoris_like_ours(kind):
    layer, adapter = adapter_on(kind, "algo=full")
    tensors = adapter.adapter_state_dict()
    assert set(tensors) == {"diff", "diff_b"} and tensors["diff"].shape == layer.weight.shape
    x = x_for(kind)
    base = layer(x)
    adapter.apply_to()
    bypass = layer(x)
    ours = adapter.merged_weight()
    ours_bias = layer.bias + tensors["diff_b"]
    assert (bypass - base).abs().max() > 1e-2
    assert torch.allclose(bypass, run_layer(layer, x, ours, ours_bias), atol=1e-5)

    lyco = lycoris_loaded(tensors, layer)
    assert type(lyco).__name__ == "FullModule"
    weight, bias = lyco.get_merged_weight(multiplier=1)
    assert torch.allclose(weight, ours, atol=1e-6) and torch.allclose(bias, ours_bias, atol=1e-6)

    adapter.merge_to_base(0.5)
    assert torch.allclose(layer.weight, lyco.org_weight + 0.5 * tensors["diff"], atol=1e-6)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_dylora_file_merges_in_lycoris_like_ours(kind):
    layer, adapter = adapter_on(kind, "algo=dylora", "block_size=2")
    tensors = adapter.adapter_state_dict()
    x = x_for(kind)
    adapter.apply_to()
    adapter.eval()
    ours = adapter.merged_weight()
    assert torch.allclose(layer(x), run_layer(layer, x, ours, layer.bias), atol=1e-5)
    lyco = lycoris_loaded(tensors, layer)
    assert torch.allclose(lyco.get_merged_weight(multiplier=1)[0].reshape(ours.shape), ours, atol=1e-5)
    # at alpha / rank: 4 / 8
    delta = (tensors["lora_up.weight"].flatten(1) @ tensors["lora_down.weight"].flatten(1)) * 0.5
    assert torch.allclose((ours - layer.weight).flatten(1), delta, atol=1e-5)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_names_and_sizes_are_the_packages(kind):
    from lycoris.modules.dylora import DyLoraModule
    from lycoris.modules.full import FullModule

    for algo, package_module in (("full", FullModule), ("dylora", DyLoraModule)):
        layer, adapter = adapter_on(kind, f"algo={algo}", "block_size=2")
        package = package_module("lycoris_x", LAYERS[kind]().requires_grad_(False), 1.0, 8, 4.0, block_size=2)
        if algo == "full":
            package.apply_to()
        theirs = package.custom_state_dict()
        ours = adapter.adapter_state_dict()
        assert sorted(theirs) == sorted(ours), algo
        assert all(theirs[k].numel() == ours[k].numel() for k in ours), algo


def test_dylora_trains_the_newest_block_of_a_random_rank():
    layer, adapter = adapter_on("linear", "algo=dylora", "block_size=2")
    adapter.apply_to()
    adapter.train()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        adapter.zero_grad()
        layer(x_for("linear")).sum().backward()
        rows = (adapter.lora_down.weight.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
        assert len(rows) == 2 and rows[0] % 2 == 0 and rows[1] == rows[0] + 1, rows  # one block only
        seen.add(rows[0])
    assert seen == {0, 2, 4, 6}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return write_tiny_checkpoints(root, "sd1")["safetensors"], write_dreambooth_folder(root / "data")


@pytest.mark.parametrize("algo,keys", [("full", {"diff", "diff_b"}), ("dylora", {"lora_down.weight", "lora_up.weight", "alpha"})])
def test_train_resume_from_weights_and_sample(tiny_sd, tmp_path, algo, keys):
    model, data = tiny_sd
    common = [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
              "--network_module=lycoris.kohya", "--network_dim=4", "--network_alpha=2", "--max_train_steps=1",
              "--learning_rate=1e-3", "--max_data_loader_n_workers=0", "--network_train_unet_only",
              "--network_args", f"algo={algo}", "block_size=2"]
    out = tmp_path / "out"
    assert main(["train", *common, f"--output_dir={out}", "--output_name=a"]) == 0
    with safe_open(str(out / "a.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    assert names and {k.split(".", 1)[1] for k in names} == keys
    assert main(["train", *common, f"--output_dir={out}", "--output_name=b", f"--network_weights={out / 'a.safetensors'}",
                 "--max_train_steps=1"]) == 0
    images = tmp_path / "images"
    assert main(["sample", f"--ckpt_path={model}", f"--lora={out / 'b.safetensors'}", "--prompt=sks toy", "--steps=2",
                 "--width=64", "--height=64", f"--output={images}"]) == 0
    assert list(images.glob("*.png"))
    if algo == "dylora":  # the split tool reads block_size as the file's unit
        assert main(["lora", "dylora", f"--model={out / 'b.safetensors'}", f"--save_to={out / 'r2.safetensors'}",
                     "--new_rank=2"]) == 0
        with safe_open(str(out / "r2.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")} == {2}
        assert main(["lora", "dylora", f"--model={out / 'b.safetensors'}", f"--save_to={out / 'r3.safetensors'}",
                     "--new_rank=3"]) != 0

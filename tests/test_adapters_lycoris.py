"""`--network_module lycoris.kohya` through the lycoris-lora package, and files other programs must read.

* every LyCORIS algorithm on a Linear, a 1x1 and a 3x3 conv, in float32 and bfloat16: zero-init unchanged,
  merged == bypass, save -> load exact;
* the seed's command line (`algo=locon`, `preset=full`, `conv_dim`, `use_tucker`, `use_scalar`,
  `rank_dropout_scale`, `train_norm`, `block_dims`/`block_alphas`) trains two steps on a tiny SD 1.5;
* every saved key is one ComfyUI's loader maps (a re-statement of `comfy/lora.py`'s key map for SD 1.x and
  of the tensor names its weight adapters read, peers.md §4.2);
* LoCon files load in diffusers and give the images our own merge gives (1e-4);
* DoRA files (`dora_scale`, per input channel by default) merge in ComfyUI (a re-statement of
  `comfy/weight_adapter/base.py` `weight_decompose`) and in LyCORIS exactly as in lorakit, weights and images;
  diffusers drops `dora_scale` and renders the plain LoRA, which a test pins down.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from helpers import build_from_options
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lycoris")

from lorakit.adapters.formats import save_lora_file  # noqa: E402
from lorakit.adapters.lycoris_bridge import LycorisAdapter, LycorisOptions  # noqa: E402
from lorakit.families.common.unet_blocks import lycoris_block_of as sd_block_index  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.adapters.targets import AdapterTarget  # noqa: E402
from lorakit.families.registry import get_family  # noqa: E402

LAYERS = {
    "linear": lambda: nn.Linear(16, 32),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1),
    "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1),
}
ALGOS = {
    "locon": ["algo=locon"],
    "locon-tucker-scalar": ["algo=locon", "use_tucker=True", "use_scalar=True"],
    "locon-dora": ["algo=locon", "dora_wd=True"],
    "loha": ["algo=loha"],
    "lokr": ["algo=lokr", "factor=4"],
    "lokr-dora": ["algo=lokr", "factor=4", "dora_wd=True"],
    "ia3": ["algo=ia3"],
    "glora": ["algo=glora"],
    "diag-oft": ["algo=diag-oft"],
    "boft": ["algo=boft"],
}


def parse(args: list[str], dim: int = 4, alpha: float = 2.0) -> LycorisOptions:
    return LycorisOptions.parse(dict(a.split("=", 1) for a in args), dim, alpha, None)


def make_layer(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return LAYERS[kind]().to(dtype).requires_grad_(False)


def make_input(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn((3, 5, 16) if kind == "linear" else (3, 16, 6, 6), generator=g).to(dtype)


def randomise(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            param.copy_(param * (1 + 0.2 * noise.abs()) if "dora_scale" in name else 0.2 * noise)


def plain_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.to(x.dtype)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_invariants(algo, kind, dtype):
    options = parse(ALGOS[algo])
    layer, x = make_layer(kind, dtype), make_input(kind, dtype)
    base = layer(x)
    adapter = LycorisAdapter(AdapterTarget("lora_unet_x", layer, "unet", 4, 2.0), options).eval()
    adapter.apply_to()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    scale = base.abs().max()
    assert (layer(x) - base).abs().max() <= tol * scale, "a fresh adapter must leave the layer unchanged"

    randomise(adapter)
    bypass = layer(x)
    merged = plain_forward(layer, x, adapter.merged_weight())
    assert (bypass - base).abs().max() > 1e-2 * scale
    assert (bypass.float() - merged.float()).abs().max() <= tol * scale

    state = adapter.adapter_state_dict()
    fresh = LycorisAdapter(AdapterTarget("lora_unet_x", make_layer(kind, dtype), "unet", 4, 2.0), options)
    fresh.load_adapter_tensors(state, source="file.safetensors")
    for key, value in fresh.adapter_state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.allclose(fresh.delta_weight(), adapter.delta_weight(), atol=1e-6)
    adapter.restore()
    assert torch.equal(layer(x), base)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_glora_delta_matches_the_package_and_works_on_bf16(kind):
    """lorakit forms GLoRA's ΔW itself (the package's merge fails on a bfloat16 weight): on float32 it equals the
    package's `get_diff_weight`, and on a bfloat16 layer it equals the package's ΔW over the same weight in float32."""
    options = parse(["algo=glora", "use_scalar=True"])
    layer = make_layer(kind, torch.float32)
    adapter = LycorisAdapter(AdapterTarget("lora_unet_x", layer, "unet", 4, 2.0), options)
    randomise(adapter)
    with torch.no_grad():
        adapter.lyco.scalar.fill_(0.7)
    package, _ = adapter.lyco.get_diff_weight(1.0, layer.weight.shape)
    assert package.abs().max() > 1e-2
    assert torch.allclose(adapter.delta_weight(), package.float(), atol=1e-6)

    half = make_layer(kind, torch.bfloat16)
    on_half = LycorisAdapter(AdapterTarget("lora_unet_x", half, "unet", 4, 2.0), options)
    on_half.load_adapter_tensors(adapter.adapter_state_dict(), source="file.safetensors")
    with torch.no_grad():  # the file holds a2, b2 times the scalar (the package's custom state dict)
        layer.weight.copy_(half.weight.float())
    reference, _ = adapter.lyco.get_diff_weight(1.0, layer.weight.shape)
    assert on_half.delta_weight().dtype == torch.float32
    assert torch.allclose(on_half.delta_weight(), reference, atol=1e-5)
    before = half.weight.clone()
    on_half.apply_to()
    on_half.merge_to_base(0.5)
    assert half.weight.dtype == torch.bfloat16
    assert torch.allclose(half.weight.float(), (before.float() + 0.5 * reference).bfloat16().float())


def test_options_are_checked():
    with pytest.raises(ConfigError, match="algo=nope"):
        parse(["algo=nope"])
    with pytest.raises(ConfigError, match="preset=nope"):
        parse(["preset=nope"])
    with pytest.raises(ConfigError, match="use_scalar"):
        parse(["use_scalar=perhaps"])
    with pytest.raises(ConfigError, match="--network_dim 4 is not a multiple of block_size 3"):
        parse(["algo=dylora", "block_size=3"])
    with pytest.raises(ConfigError, match="conv_dimm"):
        parse(["conv_dimm=4"])
    with pytest.raises(ConfigError, match="exactly 25"):
        LycorisOptions.parse({"block_dims": "4,4"}, 4, 1.0, None, get_family("sd").block_layout)


def test_sd_block_indices():
    assert sd_block_index("conv_in") == 0
    assert sd_block_index("down_blocks_0_attentions_1_proj_in") == 2
    assert sd_block_index("down_blocks_1_downsamplers_0_conv") == 6
    assert sd_block_index("mid_block_resnets_0_conv1") == 12
    assert sd_block_index("up_blocks_0_resnets_2_conv2") == 15
    assert sd_block_index("up_blocks_3_attentions_2_proj_out") == 24
    assert sd_block_index("time_embedding_linear_1") is None


# ---------------------------------------------------------------------- tiny SD 1.5


SEED_ARGS = [
    "preset=full", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "use_scalar=False", "rank_dropout_scale=False",
    "algo=locon", "train_norm=False", "block_dims=" + ",".join(["8"] * 25), "block_alphas=" + ",".join(["0.0625"] * 25),
]


def options(*args: str, dim: int = 4, alpha: float = 2.0, **extra) -> SimpleNamespace:
    values = dict(a.split("=", 1) for a in args)
    base = dict(
        network_module="lycoris.kohya", network_dim=dim, network_alpha=alpha, network_dropout=None,
        network_args=list(args) or None, network_kwargs=lambda: dict(values), network_weights=None,
        network_train_unet_only=False, network_train_text_encoder_only=False,
    )
    base.update(extra)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def family():
    from lorakit.families.sd.family import StableDiffusionFamily

    return StableDiffusionFamily()


def tiny_sd():
    from lorakit.families.sd.tiny import build_tiny_sd

    comps = build_tiny_sd("sd1", seed=0)
    for part in [comps.denoiser, *comps.text_encoders]:
        part.requires_grad_(False)
    return comps


def sd_loss(family, comps, batch) -> torch.Tensor:
    latents, noise, t = batch
    text = family.encode_text(comps, ["a red square"] * latents.shape[0])
    alphas = torch.linspace(0.999, 0.01, 1000)[t].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    return F.mse_loss(family.predict(comps, noisy, t, text, None).float(), noise)


TRAINING = {
    "seed-locon": SEED_ARGS,
    "loha-tucker-scalar": ["algo=loha", "conv_dim=4", "use_tucker=True", "use_scalar=True", "rank_dropout=0.1", "rank_dropout_scale=True"],
    "lokr-train-norm": ["algo=lokr", "preset=attn-mlp", "factor=4", "train_norm=True", "module_dropout=0.1"],
    "locon-dora": ["algo=locon", "preset=attn-only", "dora_wd=True", "dropout=0.1"],
}


@pytest.mark.parametrize("name", list(TRAINING))
def test_two_training_steps_change_the_loss(family, name):
    comps = tiny_sd()
    network = build_from_options(options(*TRAINING[name]), family, comps, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]))
    groups, descriptions = network.prepare_optimizer_params(1e-2, 1e-2, 1e-2)
    assert descriptions and set(descriptions) <= {"textencoder", "unet"}
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    network.eval()
    with torch.no_grad():
        before = float(sd_loss(family, comps, batch))
    network.train()
    for _ in range(2):
        optimizer.zero_grad()
        sd_loss(family, comps, batch).backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        after = float(sd_loss(family, comps, batch))
    assert abs(after - before) > 1e-6

    state = network.state_dict_kohya()
    again = build_from_options(options(*TRAINING[name]), family, tiny_sd(), torch.device("cpu"))
    again.load_kohya_state_dict(state, source="x.safetensors")
    for key, value in again.state_dict_kohya().items():
        assert torch.equal(value, state[key]), key


def test_seed_options_ranks_and_names(family):
    comps = tiny_sd()
    network = build_from_options(options(*SEED_ARGS), family, comps, torch.device("cpu"))
    modules = network.lora_modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules, "kohya TE names keep text_model_"
    unet = {n: m for n, m in modules.items() if n.startswith("lora_unet_")}
    assert "lora_unet_conv_in" in unet and "lora_unet_time_embedding_linear_1" in unet, "preset full"
    in_block = unet["lora_unet_down_blocks_0_attentions_0_proj_in"].lyco
    assert in_block.lora_dim == 8 and float(in_block.alpha) == pytest.approx(0.0625), "block_dims/block_alphas"
    outside = unet["lora_unet_time_embedding_linear_1"].lyco
    assert outside.lora_dim == 4, "layers outside the 25 blocks keep network_dim"

    only_attn = build_from_options(options("preset=attn-only"), family, tiny_sd(), torch.device("cpu"))
    assert only_attn.lora_modules and all("attn" in n for n in only_attn.lora_modules)
    unet_only = build_from_options(options("preset=unet-convblock-only"), family, tiny_sd(), torch.device("cpu"))
    assert all(re.search(r"(resnets|samplers)_|conv_(in|out)$", n) for n in unet_only.lora_modules)


def test_sdxl_block_dims_follow_sdxl_23_blocks(caplog):
    """lycoris-lora 4.1.3's kohya entry ignores block_dims; lorakit reads them with sd-scripts' SDXL numbering (23
    blocks: 0 time/label embedding, 1 + N input_blocks_N, 10 + N middle_block, 13 + N output_blocks_N, 22 out)."""
    from lorakit.families.sdxl.family import StableDiffusionXLFamily
    from lorakit.families.sdxl.tiny import build_tiny_sdxl

    family, comps = StableDiffusionXLFamily(), build_tiny_sdxl(seed=0)
    dims = [str(i + 1) for i in range(23)]
    network = build_from_options(options("algo=locon", "block_dims=" + ",".join(dims), network_train_unet_only=True),
                            family, comps, torch.device("cpu"))
    modules = network.lora_modules
    assert modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].lyco.lora_dim == 6  # IN04 = block 5
    assert modules["lora_unet_output_blocks_0_1_proj_in"].lyco.lora_dim == 14  # OUT00 = block 13
    assert modules["lora_unet_time_embed_0"].lyco.lora_dim == 1  # block 0
    network.restore()
    with pytest.raises(ConfigError, match="block_dims: needs exactly 23 values for this SDXL U-Net"):
        build_from_options(options("block_dims=" + ",".join(dims[:-1])), family, comps, torch.device("cpu"))
    with pytest.raises(ConfigError, match="block_alphas: needs exactly 23"):
        build_from_options(options("block_dims=" + ",".join(dims), "block_alphas=1,2"), family, comps, torch.device("cpu"))
    # the users' guides' 25 SD values: SD 1.x's indices over the diffusers block paths, with a warning
    with caplog.at_level("WARNING", logger="lorakit"):
        sd_layout = build_from_options(options("block_dims=" + ",".join(str(i + 1) for i in range(25)), network_train_unet_only=True),
                                  family, comps, torch.device("cpu"))
    assert "SDXL has 23 blocks" in caplog.text
    # diffusers down_blocks.1.attentions.0 (SGM input_blocks_4_1) is SD's IN04 = index 4
    assert sd_layout.lora_modules["lora_unet_input_blocks_4_1_proj_in"].lyco.lora_dim == 5


# ---------------------------------------------------------------------- ComfyUI's key map


CLIP_MAP = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj")
# tensor names ComfyUI's weight adapters read (comfy/weight_adapter: lora, loha, lokr, glora, oft, boft) and
# comfy/lora.py's diff / set / norm patches
COMFY_TENSORS = {
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
    "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a",
    "lokr_w2_b", "lokr_t2", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks", "rescale", "diff",
    "diff_b", "w_norm", "b_norm",
}


def comfy_module_names(comps) -> set[str]:
    """`lora_unet_<diffusers path>` for every U-Net weight, `lora_te_text_model_encoder_layers_<i>_<proj>`."""
    names = {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        for k in comps.denoiser.state_dict()
        if k.endswith(".weight")
    }
    names |= {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(32) for c in CLIP_MAP}
    return names


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr", "glora", "diag-oft", "boft"])
def test_every_saved_key_is_one_comfyui_maps(family, algo):
    comps = tiny_sd()
    args = [f"algo={algo}", "preset=full", "conv_dim=4", "use_tucker=True"]
    if algo == "lokr":
        args.append("factor=4")
    network = build_from_options(options(*args), family, comps, torch.device("cpu"))
    accepted = comfy_module_names(comps)
    state = network.state_dict_kohya()
    assert state
    for key in state:
        module, _, tensor = key.partition(".")
        assert module in accepted, f"ComfyUI maps no model weight to {module}"
        assert tensor in COMFY_TENSORS, f"ComfyUI reads no tensor named {tensor} ({key})"


# ---------------------------------------------------------------------- diffusers


PROMPT = "a red square on a blue background"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder

    path = tmp_path_factory.mktemp("pipe") / "sd1"
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), path)
    return path


def load_pipeline(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


def render_base_and_merged(network, pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's image without the network, then with it merged into the weights."""
    network.restore()
    base = render(pipe)
    network.apply_to()
    network.merge_to_base()
    return base, render(pipe)


DIFFUSERS_CASES = {
    "lycoris-locon": ("lycoris.kohya", ["algo=locon", "preset=attn-mlp"]),
    "lycoris-locon-conv": ("lycoris.kohya", ["algo=locon", "preset=unet-convblock-only", "conv_dim=4", "conv_alpha=2"]),
}


@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_diffusers_loads_our_file_and_matches_our_merge(family, pipeline_dir, tmp_path, case):
    module, args = DIFFUSERS_CASES[case]
    ours = load_pipeline(pipeline_dir)
    comps = SimpleNamespace(denoiser=ours.unet, text_encoders=[ours.text_encoder])
    network = build_from_options(options(*args, network_module=module), family, comps, torch.device("cpu"))
    randomise(network, seed=3)
    lora_file = tmp_path / "adapter.safetensors"
    save_lora_file(network.state_dict_kohya(), lora_file, {"ss_network_module": module})
    base, merged = render_base_and_merged(network, ours)

    theirs = load_pipeline(pipeline_dir)
    theirs.load_lora_weights(str(lora_file), adapter_name="ours")
    loaded = render(theirs)
    assert (merged - base).abs().max() > 1e-2, "the adapter must change the image for the comparison to mean anything"
    assert (loaded - merged).abs().max() < 1e-4


# ---------------------------------------------------------------------- DoRA in other programs


def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength=1.0):
    """ComfyUI's DoRA merge (`comfy/weight_adapter/base.py` `weight_decompose`, v0.3.77), float32.

    `lora_diff` is up·down, `alpha` the file's alpha/rank. The axis comes from the shape of `dora_scale`; on the
    output axis ComfyUI divides by the row norms of the base weight W, on the input axis by the column norms of
    W + ΔW.
    """
    weight = weight.float().clone()
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        weight_norm = weight_norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (
            weight_calc.transpose(0, 1)
            .reshape(weight_calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
            .transpose(0, 1)
        )
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale.float() / weight_norm)
    return weight + strength * (weight_calc - weight)


def comfy_merge_file_tensors(tensors: dict[str, torch.Tensor], weight: torch.Tensor, strength: float = 1.0):
    """ComfyUI's LoRA adapter for one module of a kohya file: up·down (reshaped to W), alpha/rank, DoRA."""
    up, down = tensors["lora_up.weight"].float(), tensors["lora_down.weight"].float()
    diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
    alpha = float(tensors["alpha"]) / down.shape[0]
    return comfy_weight_decompose(tensors["dora_scale"], weight, diff, alpha, strength)


def lycoris_merge_file_tensors(tensors: dict[str, torch.Tensor], layer: nn.Module, wd_on_out: bool):
    """LyCORIS' LoCon module with weight_decompose, given the file's tensors, merged at multiplier 1."""
    from lycoris.modules.locon import LoConModule

    module = LoConModule("lycoris_x", layer, 1.0, lora_dim=tensors["lora_down.weight"].shape[0],
                         alpha=float(tensors["alpha"]), weight_decompose=True, wd_on_out=wd_on_out)
    with torch.no_grad():
        module.lora_up.weight.copy_(tensors["lora_up.weight"])
        module.lora_down.weight.copy_(tensors["lora_down.weight"])
        module.dora_scale.copy_(tensors["dora_scale"])
    return module.get_merged_weight(multiplier=1)[0]


def dora_module(kind: str, wd_on_output: bool):
    from lorakit.adapters.dora import DoRAModule

    layer = make_layer(kind, torch.float32)
    adapter = DoRAModule("lora_unet_x", layer, 4, 2.0, wd_on_output=wd_on_output)
    randomise(adapter, seed=5)
    return layer, adapter


@pytest.mark.parametrize("kind", list(LAYERS))
def test_dora_file_merges_in_comfyui_and_lycoris_like_ours(kind):
    """The default layout, dora_scale (1, in[, 1, 1]): ComfyUI, LyCORIS (wd_on_out=False) and lorakit agree."""
    layer, adapter = dora_module(kind, wd_on_output=False)
    tensors = adapter.adapter_state_dict()
    assert tensors["dora_scale"].shape == (1, 16) + (1, 1) * (kind != "linear")
    ours = adapter.merged_weight()
    assert (ours - layer.weight).abs().max() > 1e-2
    assert (comfy_merge_file_tensors(tensors, layer.weight) - ours).abs().max() < 1e-5
    assert (comfy_merge_file_tensors(tensors, layer.weight, 0.6) - adapter.merged_weight(0.6)).abs().max() < 1e-5
    assert (lycoris_merge_file_tensors(tensors, layer, wd_on_out=False) - ours).abs().max() < 1e-5


@pytest.mark.parametrize("kind", list(LAYERS))
def test_output_axis_dora_file_agrees_with_lycoris_but_not_comfyui(kind, caplog):
    """dora_scale (out, 1[, 1, 1]): LyCORIS' own file loader merges it like lorakit; ComfyUI/Forge divide by ‖W‖."""
    from lycoris.modules import get_module, make_module

    from lorakit.adapters.dora import dora_weight_norm

    layer, adapter = dora_module(kind, wd_on_output=True)
    with caplog.at_level("WARNING", logger="lorakit.adapters.dora"):
        import lorakit.adapters.dora as dora

        dora._warned_output_axis = False
        tensors = adapter.adapter_state_dict()
    assert "ComfyUI" in caplog.text
    ours = adapter.merged_weight()
    file = {f"lycoris_x.{k}": v for k, v in tensors.items()}
    kind_of, params = get_module(file, "lycoris_x")
    lyco = make_module(kind_of, params, "lycoris_x", layer)
    assert (lyco.get_merged_weight(multiplier=1)[0] - ours).abs().max() < 1e-5
    assert (lycoris_merge_file_tensors(tensors, layer, wd_on_out=True) - ours).abs().max() < 1e-5

    comfy = comfy_merge_file_tensors(tensors, layer.weight)
    assert (comfy - ours).abs().max() > 1e-3, "ComfyUI normalises output-axis files by the base weight's norm"
    combined = layer.weight + adapter.delta_weight()
    assert torch.allclose(comfy, tensors["dora_scale"] * combined / dora_weight_norm(layer.weight, 0), atol=1e-5)


def _named_kohya_modules(pipe) -> dict[str, nn.Module]:
    names = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    # ComfyUI's CLIP key map: lora_te_text_model_encoder_layers_<i>_<proj> (the HF CLIPTextModel's own paths)
    for n, m in pipe.text_encoder.named_modules():
        path = n if n.startswith("text_model.") else "text_model." + n
        names["lora_te_" + path.replace(".", "_")] = m
    return names


def _dora_file(family, pipe, tmp_path, args):
    comps = SimpleNamespace(denoiser=pipe.unet, text_encoders=[pipe.text_encoder])
    network = build_from_options(options("dora_wd=True", *args, network_module="networks.lora"), family, comps,
                            torch.device("cpu"))
    randomise(network, seed=3)
    state = network.state_dict_kohya()
    lora_file = tmp_path / "dora.safetensors"
    save_lora_file(state, lora_file, {"ss_network_module": "networks.lora"})
    return network, state, lora_file


DORA_IMAGE_CASES = {
    "dora": [],
    "dora-conv": ["conv_dim=4", "conv_alpha=2"],
}


@pytest.mark.parametrize("case", list(DORA_IMAGE_CASES))
def test_comfyui_renders_our_dora_file_like_our_merge(family, pipeline_dir, tmp_path, case):
    ours = load_pipeline(pipeline_dir)
    network, state, _ = _dora_file(family, ours, tmp_path, DORA_IMAGE_CASES[case] + ["wd_on_output=False"])
    assert all(v.shape[0] == 1 for k, v in state.items() if k.endswith(".dora_scale")), "input-axis layout"
    base, merged = render_base_and_merged(network, ours)

    theirs = load_pipeline(pipeline_dir)
    modules = _named_kohya_modules(theirs)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, tensor = key.partition(".")
        by_module.setdefault(name, {})[tensor] = value
    with torch.no_grad():
        for name, tensors in by_module.items():
            weight = modules[name].weight
            weight.copy_(comfy_merge_file_tensors(tensors, weight).to(weight.dtype))
    loaded = render(theirs)
    assert (merged - base).abs().max() > 1e-2, "the adapter must change the image for the comparison to mean anything"
    assert (loaded - merged).abs().max() < 1e-4


@pytest.mark.parametrize("wd_on_output", [False, True], ids=["input-axis", "output-axis"])
@pytest.mark.parametrize("case", list(DORA_IMAGE_CASES))
def test_diffusers_drops_dora_scale_and_renders_the_plain_lora(family, pipeline_dir, tmp_path, case, wd_on_output):
    """diffusers 0.42's SD loader filters out every `dora_scale` key (huggingface/diffusers#9547), whatever the
    axis, and applies W + (alpha/r)·up·down: its images equal our plain-LoRA merge, not our DoRA merge."""
    ours = load_pipeline(pipeline_dir)
    args = DORA_IMAGE_CASES[case] + [f"wd_on_output={wd_on_output}"]
    network, _, lora_file = _dora_file(family, ours, tmp_path, args)
    network.restore()
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.org_module.weight += module.delta_weight().to(module.org_module.weight.dtype)
    plain = render(ours)
    for module in network.lora_modules.values():
        with torch.no_grad():
            module.org_module.weight -= module.delta_weight().to(module.org_module.weight.dtype)
    network.apply_to()
    network.merge_to_base()
    dora_merged = render(ours)

    theirs = load_pipeline(pipeline_dir)
    theirs.load_lora_weights(str(lora_file), adapter_name="ours")
    assert not any("lora_magnitude_vector" in k for k in theirs.unet.state_dict()), "no DoRA magnitude loaded"
    loaded = render(theirs)
    assert (dora_merged - plain).abs().max() > 1e-2, "the magnitudes must matter for the comparison to mean anything"
    assert (loaded - plain).abs().max() < 1e-4

"""lora_flux's `network_reg_dims`, `network_reg_lrs` and LoRA-GGPO (`ggpo_sigma`, `ggpo_beta`) on a tiny FLUX.1.

* reg dims: the modules a pattern finds get its rank, over the per-type ranks and block indices, not over
  `train_blocks`; 0 skips; the text encoders and the `in_dims` embedders are candidates too; the first pair wins;
* reg lrs: the optimizer groups (LRs, descriptions, LoRA+ split) as sd-scripts'
  `prepare_optimizer_params_with_multiple_te_lrs` makes them;
* GGPO: the perturbation of a tiny linear layer against a hand computation of sd-scripts' formula, the norms
  measured between clipping and the optimizer step (the Trainable's hook), and a run from the command line with
  its file and logged norms.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from safetensors import safe_open

from helpers import build_from_options, network_options, optimizer_groups, spec_of, write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.adapters.ggpo import GGPOLoRAModule, ggpo_logs
from lorakit.errors import ConfigError
from lorakit.families.flux.family import FluxFamily
from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files
from lorakit.training.updates import StepAfterBackward

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_flux():
    comps = build_tiny_flux(0)
    for part in [comps.denoiser, *comps.text_encoders]:
        part.requires_grad_(False)
    return FluxFamily(), comps


def network(tiny_flux, *args: str, **extra):
    family, comps = tiny_flux
    comps = copy.copy(comps)
    comps.denoiser = copy.deepcopy(comps.denoiser)
    comps.text_encoders = [copy.deepcopy(e) for e in comps.text_encoders]
    return build_from_options(network_options("networks.lora_flux", *args, **extra), family, comps, CPU)


def ranks(net) -> dict[str, int]:
    return {name: module.rank for name, module in net.lora_modules.items()}


# ---------------------------------------------------------------------------------------------------------
# network_reg_dims
# ---------------------------------------------------------------------------------------------------------


def test_reg_dims_override_type_dims_and_block_indices(tiny_flux):
    plain = ranks(network(tiny_flux, "img_attn_dim=2", "train_single_block_indices=0"))
    assert plain["lora_unet_double_blocks_0_img_attn_qkv"] == 2
    assert "lora_unet_single_blocks_1_linear1" not in plain  # not in the chosen single blocks

    chosen = ranks(network(
        tiny_flux, "img_attn_dim=2", "train_single_block_indices=0",
        "network_reg_dims=img_attn_qkv=8,single_blocks_1_linear=6,single_blocks_\\d+_linear1=3,txt_mlp=0",
    ))
    assert chosen["lora_unet_double_blocks_0_img_attn_qkv"] == 8  # over img_attn_dim
    assert chosen["lora_unet_double_blocks_0_img_attn_proj"] == 2  # img_attn_dim still
    assert chosen["lora_unet_single_blocks_1_linear1"] == 6  # over the block indices; the first pair wins
    assert chosen["lora_unet_single_blocks_1_linear2"] == 6
    assert chosen["lora_unet_single_blocks_0_linear1"] == 3
    assert chosen["lora_unet_single_blocks_0_modulation_lin"] == 4  # --network_dim
    assert not any("txt_mlp" in name for name in chosen)  # 0 skips
    untouched = {k: v for k, v in plain.items() if not any(s in k for s in ("img_attn_qkv", "single_blocks", "txt_mlp"))}
    assert untouched.items() <= chosen.items()


def test_reg_dims_respect_train_blocks_and_reach_encoders_and_embedders(tiny_flux):
    chosen = ranks(network(tiny_flux, "train_blocks=single", "in_dims=[0,0,0,0,0]",
                           "network_reg_dims=double_blocks=8,lora_te1_.*layers_0_.*q_proj=5,time_in_in_layer=7"))
    assert not any("double_blocks" in name for name in chosen)  # not a candidate under train_blocks=single
    assert chosen["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == 5
    assert chosen["lora_te1_text_model_encoder_layers_1_self_attn_q_proj"] == 4
    assert chosen["lora_unet_time_in_in_layer"] == 7
    assert not any(name.startswith(("lora_unet_img_in", "lora_unet_txt_in")) for name in chosen)  # in_dims 0


def test_reg_dims_alpha_is_network_alpha(tiny_flux):
    net = network(tiny_flux, "network_reg_dims=img_attn_qkv=8", alpha=2.0)
    module = net.lora_modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert module.rank == 8 and float(module.alpha) == 2.0


def test_bad_reg_pairs_are_problems(tiny_flux):
    family, _ = tiny_flux
    with pytest.raises(ConfigError) as error:
        spec_of(family, network_options("networks.lora_flux", "network_reg_dims=qkv=x,(oops=4,noequals",
                                        "network_reg_lrs=proj=fast"))
    text = "\n".join(error.value.problems)
    assert "'qkv' must be a whole number" in text and "'(oops' is not a regular expression" in text
    assert "'noequals' is not regex=value" in text and "network_reg_lrs: the value of 'proj' must be a number" in text


# ---------------------------------------------------------------------------------------------------------
# network_reg_lrs
# ---------------------------------------------------------------------------------------------------------


def test_reg_lrs_make_groups_before_the_default_ones(tiny_flux):
    family, _ = tiny_flux
    args = ("network_reg_lrs=img_attn=1e-5,single_blocks=2e-5,lora_te1_.*layers_0_=3e-5,txt_mlp=0", "loraplus_lr_ratio=4")
    net = network(tiny_flux, *args)
    cfg = network_options("networks.lora_flux", *args, learning_rate=1e-3, unet_lr=None, text_encoder_lr=None)
    groups, names = optimizer_groups(cfg, net, family)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert names == ["textencoder1 reg_lr_2", "textencoder1 reg_lr_2 plus", "textencoder1", "textencoder1 plus",
                     "unet reg_lr_0", "unet reg_lr_0 plus", "unet reg_lr_1", "unet reg_lr_1 plus", "unet", "unet plus"]
    assert lrs["unet reg_lr_0"] == 1e-5 and lrs["unet reg_lr_0 plus"] == pytest.approx(4e-5)
    assert lrs["unet reg_lr_1"] == 2e-5 and lrs["textencoder1 reg_lr_2"] == 3e-5
    assert lrs["unet"] == 1e-3 and lrs["unet plus"] == pytest.approx(4e-3)

    by_param = {id(p): name for g, name in zip(groups, names) for p in g["params"]}
    modules = net.lora_modules
    assert by_param[id(modules["lora_unet_double_blocks_0_img_attn_qkv"].lora_down.weight)] == "unet reg_lr_0"
    assert by_param[id(modules["lora_unet_double_blocks_0_img_attn_qkv"].lora_up.weight)] == "unet reg_lr_0 plus"
    assert by_param[id(modules["lora_unet_single_blocks_1_linear2"].lora_down.weight)] == "unet reg_lr_1"
    assert by_param[id(modules["lora_unet_double_blocks_0_txt_attn_proj"].lora_down.weight)] == "unet"
    assert by_param[id(modules["lora_te1_text_model_encoder_layers_0_mlp_fc1"].lora_down.weight)] == "textencoder1 reg_lr_2"
    # LR 0 drops the group: those modules do not train
    assert id(modules["lora_unet_double_blocks_0_txt_mlp_0"].lora_down.weight) not in by_param


# ---------------------------------------------------------------------------------------------------------
# LoRA-GGPO
# ---------------------------------------------------------------------------------------------------------


def sd_scripts_ggpo_scale(weight, down, up, down_grad, up_grad, scale, sigma, beta):
    """sd-scripts' lora_flux update_norms / update_grad_norms / forward, re-stated: the per-row factor of P."""
    org_norm = weight.norm(dim=1, keepdim=True).mean()  # every row sampled (out <= 1000)
    product = up @ down  # its `.mul(self.scale)` is not in place: the product is unscaled
    combined = torch.sqrt(org_norm**2 + torch.sum(product**2, dim=1, keepdim=True))
    grad = scale * (up @ down_grad + up_grad @ down)
    grad_norms = torch.norm(grad, dim=1, keepdim=True)
    return (sigma * torch.sqrt(combined**2) + beta * grad_norms**2) * (1.0 / math.sqrt(weight.shape[0]))


def test_ggpo_perturbation_matches_sd_scripts_formula():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).requires_grad_(False)
    module = GGPOLoRAModule("lora_unet_x", layer, 3, 1.5, sigma=0.03, beta=0.01)
    module.apply_to()
    module.train()
    with torch.no_grad():
        module.lora_up.weight.normal_()
    x = torch.randn(4, 6)
    unperturbed = layer(x)
    # no norms yet: the first step trains without a perturbation
    assert torch.equal(layer(x), unperturbed)
    layer(x).pow(2).sum().backward()
    down, up = module.lora_down.weight, module.lora_up.weight
    expected = sd_scripts_ggpo_scale(layer.weight, down.detach(), up.detach(), down.grad, up.grad, 0.5, 0.03, 0.01)
    module.before_optimizer_step()
    assert torch.allclose(module.perturbation_scale(), expected, atol=1e-6)

    torch.manual_seed(5)
    perturbed = layer(x)
    torch.manual_seed(5)
    noise = torch.randn(5, 6) * expected
    assert torch.allclose(perturbed, unperturbed.detach() + x @ noise.T, atol=1e-5)
    module.eval()
    assert torch.allclose(layer(x), unperturbed, atol=1e-6), "no perturbation outside training"
    logs = ggpo_logs([module])
    assert logs["norm/avg_key_norm"] == pytest.approx(float((up @ down).detach().norm(dim=1).mean()), rel=1e-5)
    assert set(logs) == {"norm/avg_key_norm", "norm/avg_grad_norm", "norm/avg_combined_norm"}


def test_ggpo_norms_are_measured_after_clipping_before_the_step():
    """StepAfterBackward calls the Trainable's hook with the clipped gradients, before the optimizer moves them."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).requires_grad_(False)
    module = GGPOLoRAModule("lora_unet_x", layer, 3, 3.0, sigma=0.1, beta=1.0)
    module.apply_to()
    with torch.no_grad():
        module.lora_up.weight.normal_()
    params = list(module.parameters())
    seen = {}

    def hook():
        seen["total_norm"] = float(torch.cat([p.grad.flatten() for p in params]).norm())
        seen["up"] = module.lora_up.weight.detach().clone()
        module.before_optimizer_step()

    cfg = type("Cfg", (), {"max_grad_norm": 1e-3})()
    accelerator = type("Acc", (), {"num_processes": 1, "clip_grad_norm_": staticmethod(torch.nn.utils.clip_grad_norm_)})()
    optimizer = torch.optim.SGD(params, lr=0.1)
    (layer(torch.randn(4, 6)) * 100).pow(2).sum().backward()
    StepAfterBackward(cfg, accelerator, optimizer, params, hook).after_backward(sync=True)
    assert seen["total_norm"] == pytest.approx(1e-3, rel=1e-4)  # clipped
    assert not torch.equal(seen["up"], module.lora_up.weight)  # the optimizer stepped after the hook
    assert module.grad_norms is not None and float(module.grad_norms.max()) < 1e-2


def test_ggpo_spec_and_modules_on_flux(tiny_flux):
    net = network(tiny_flux, "ggpo_sigma=0.03", "ggpo_beta=0.01", "split_qkv=True")
    modules = net.lora_modules
    assert isinstance(modules["lora_unet_double_blocks_0_img_attn_proj"], GGPOLoRAModule)
    assert isinstance(modules["lora_te1_text_model_encoder_layers_0_mlp_fc1"], GGPOLoRAModule)
    # one LoRA per part (split_qkv): lora_flux leaves those unperturbed
    assert type(modules["lora_unet_double_blocks_0_img_attn_qkv"]).__name__ == "LoRAModule"
    assert "org_norm" not in net.state_dict_kohya().__repr__()

    family, _ = tiny_flux
    with pytest.raises(ConfigError, match="LoRA-GGPO needs ggpo_beta too"):
        spec_of(family, network_options("networks.lora_flux", "ggpo_sigma=0.03"))
    with pytest.raises(ConfigError, match="not available with networks.lora_fa"):
        spec_of(family, network_options("networks.lora_fa", "ggpo_sigma=0.03", "ggpo_beta=0.01"))


def test_ggpo_and_reg_options_train_from_the_command_line(tiny_flux, tmp_path, caplog):
    files = save_bfl_files(tiny_flux[1], tmp_path / "bfl")
    out = tmp_path / "out"
    argv = [
        "train", f"--pretrained_model_name_or_path={files['flux1']}", f"--clip_l={files['clip_l']}",
        f"--t5xxl={files['t5xxl']}", f"--ae={files['ae']}", f"--train_data_dir={write_dreambooth_folder(tmp_path / 'data')}",
        "--resolution=64", f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora_flux",
        "--network_dim=4", "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
        "--network_train_unet_only", "--max_data_loader_n_workers=0", "--network_args", "ggpo_sigma=0.03",
        "ggpo_beta=0.01", "network_reg_dims=img_attn=8", "network_reg_lrs=single_blocks=1e-4",
    ]
    with caplog.at_level("INFO", logger="lorakit"):
        assert main(argv) == 0
    assert "LoRA-GGPO: sigma 0.03, beta 0.01" in caplog.text
    with safe_open(str(out / "tiny.safetensors"), framework="pt") as f:
        assert f.get_tensor("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight").shape[0] == 8
        assert f.get_tensor("lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight").shape[0] == 4

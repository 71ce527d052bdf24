"""The LoRA tools on SDXL, SD3 and FLUX: merge into a model, extract, resize, LoRA+LoRA merge, convert and the
bad-input errors, on tiny models of the real architectures.

The references are independent of the tools: the trainer's own network attached beside the base model (bypass)
for merges, the LoRA's own ΔW for extraction, and diffusers' `load_lora_weights` for converted files.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import targets_of
import torch

from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.cli.lora import main
from lorakit.families.flux.family import FluxFamily, image_position_ids
from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files
from lorakit.families.sd3.family import StableDiffusion3Family
from lorakit.families.sd3.tiny import build_tiny_sd3, save_sai_file
from lorakit.families.sdxl.family import StableDiffusionXLFamily
from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file
from lorakit.families.sdxl.tiny import TE1_WIDTH, TE2_WIDTH, build_tiny_sdxl
from lorakit.tools.common import load_lora
from lorakit.families.registry import get_family
from lorakit.tools.models import load_base_model
from lorakit.tools.targets import model_targets

RATIO = 0.7
CLIP_IDS = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])


def net_cfg(*args: str, unet_only: bool = False):
    kwargs = dict(a.split("=", 1) for a in args)
    return SimpleNamespace(
        network_dim=4, network_alpha=2.0, network_args=list(args) or None, network_kwargs=lambda: dict(kwargs),
        network_train_unet_only=unet_only, network_train_text_encoder_only=False, text_encoder_lr=None,
    )


def random_network(family, comps, cfg, seed=3) -> LoRANetwork:
    network = LoRANetwork(targets_of(family, comps, cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.2)
    return network


def bypass(family, comps, cfg, lora_file) -> LoRANetwork:
    """The trainer's network over `comps`, loaded from the file, attached beside the weights at RATIO."""
    network = LoRANetwork(targets_of(family, comps, cfg))
    assert not network.load_kohya_state_dict(load_lora_file(lora_file)[0], source=str(lora_file))
    network.set_multiplier(RATIO)
    network.apply_to()
    return network


def file_metadata(path) -> dict[str, str]:
    # read directly: the metadata is what is checked, whatever the format sniffing of the loaders does
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# ------------------------------------------------------------------------------------------ forwards


def sdxl_forward(comps):
    gen = torch.Generator().manual_seed(0)
    added = {"text_embeds": torch.randn(2, TE2_WIDTH, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        unet = comps.denoiser(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]),
                              encoder_hidden_states=torch.randn(2, 77, TE1_WIDTH + TE2_WIDTH, generator=gen), added_cond_kwargs=added).sample
        texts = [encoder(CLIP_IDS).last_hidden_state for encoder in comps.text_encoders]
    return [unet, *texts]


def sd3_forward(comps):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = comps.denoiser(
            hidden_states=torch.randn(1, 16, 8, 8, generator=gen), encoder_hidden_states=torch.randn(1, 12, 128, generator=gen),
            pooled_projections=torch.randn(1, 96, generator=gen), timestep=torch.tensor([500.0]), return_dict=False,
        )[0]
        texts = [encoder(CLIP_IDS).last_hidden_state for encoder in comps.text_encoders[:2]]
    return [out, *texts]


def flux_forward(comps):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = comps.denoiser(
            hidden_states=torch.randn(1, 16, 64, generator=gen), encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.4]),
            img_ids=image_position_ids(8, 8, torch.device("cpu"), torch.float32), txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]), return_dict=False,
        )[0]
        clip = comps.text_encoders[0](CLIP_IDS).last_hidden_state
    return [out, clip]


# ------------------------------------------------------------------------------------------ fixtures


def _sdxl(root):
    comps = build_tiny_sdxl(0)
    base = root / "sdxl.safetensors"
    save_sdxl_single_file(comps, base)
    return SimpleNamespace(family=StableDiffusionXLFamily(), name="sdxl", cfg=net_cfg("conv_dim=2", "conv_alpha=1"),
                           base=base, forward=sdxl_forward, comps=comps, model_args=["--sd_model", str(base)], load={})


def _sd3(root):
    comps = build_tiny_sd3(0, "sd3.5m")
    base = save_sai_file(comps, root / "sd3.safetensors")
    return SimpleNamespace(family=StableDiffusion3Family(), name="sd3", cfg=net_cfg(), base=base, forward=sd3_forward,
                           comps=comps, model_args=["--sd_model", str(base)], load={})


def _flux(root):
    comps = build_tiny_flux(0)
    files = save_bfl_files(comps, root / "flux")
    out_clip = root / "flux" / "clip_l_merged.safetensors"
    return SimpleNamespace(
        family=FluxFamily(), name="flux", cfg=net_cfg(), base=files["flux1"], forward=flux_forward, comps=comps,
        model_args=["--flux_model", str(files["flux1"]), "--clip_l", str(files["clip_l"]), "--clip_l_save_to", str(out_clip)],
        load={"clip_l": str(files["clip_l"])}, merged_load={"clip_l": str(out_clip)}, files=files,
    )


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    case = {"sdxl": _sdxl, "sd3": _sd3, "flux": _flux}[request.param](root)
    case.root = root
    case.lora = root / "lora.safetensors"
    network = random_network(case.family, case.comps, case.cfg)
    save_lora_file(network.state_dict_kohya(), case.lora, {"ss_network_module": "networks.lora"})
    case.merged = root / f"merged_{request.param}.safetensors"
    args = ["merge", *case.model_args, "--save_to", str(case.merged), "--models", str(case.lora), "--ratios", str(RATIO)]
    assert main(args) == 0
    return case


def _load(case, path, merged=False):
    extra = getattr(case, "merged_load", {}) if merged else case.load
    return load_base_model(str(path), family=case.name, files=extra)


# ------------------------------------------------------------------------------------------ merge into a model


def test_merged_weights_are_base_plus_ratio_delta(case):
    """Per module, in the file's own shape and row order (fused q/k/v, swapped modulation halves)."""
    lora = load_lora(case.lora)
    base, merged = _load(case, case.base), _load(case, case.merged, merged=True)
    with model_targets(get_family(case.name), base) as before, model_targets(get_family(case.name), merged) as after:
        assert lora.modules.keys() <= before.keys()
        for name, module in lora.modules.items():
            change = after[name].weight() - before[name].weight()
            expected = RATIO * module.delta().reshape(change.shape)
            assert torch.allclose(change, expected, atol=1e-5), name


def test_merged_model_forward_equals_bypass(case):
    merged = _load(case, case.merged, merged=True)
    base = _load(case, case.base)
    plain = case.forward(base)
    network = bypass(case.family, base, case.cfg, case.lora)
    adapted = case.forward(base)
    for ours, reference, untouched in zip(case.forward(merged), adapted, plain):
        assert (reference - untouched).abs().max() > 1e-3  # the LoRA changes every part compared
        assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    network.restore()


# ------------------------------------------------------------------------------------------ extract


def test_extract_recovers_the_merged_lora(case):
    """extract(base, merge(base, LoRA)) at dim ≥ the LoRA's rank and no clipping gives ratio·ΔW back, under the
    names a trained LoRA of the family has (fused qkv for SD3/FLUX)."""
    out = case.root / "extracted.safetensors"
    args = ["extract", "--model_org", str(case.base), "--model_tuned", str(case.merged), "--save_to", str(out),
            "--dim", "4", "--conv_dim", "2", "--clamp_quantile", "1"]
    if case.name == "flux":
        args.append("--flux")
    assert main(args) == 0
    original, extracted = load_lora(case.lora), load_lora(out)
    # a FLUX transformer file carries no text encoder, so only the transformer part can be extracted from it
    expected_names = {n for n in original.modules if case.name != "flux" or n.startswith("lora_unet_")}
    assert extracted.modules.keys() == expected_names
    for name in expected_names:
        recovered, module = extracted.modules[name], original.modules[name]
        assert recovered.rank <= 4 and recovered.alpha == recovered.rank
        expected = RATIO * module.delta()
        assert torch.allclose(recovered.delta().reshape(expected.shape), expected, atol=2e-5), name
    assert file_metadata(out)["ss_base_model_version"] == {"sdxl": "sdxl_base_v1-0", "sd3": "5-medium", "flux": "flux1"}[case.name]
    if case.name == "flux":  # the fixture's model has a guidance embedding: dev
        assert file_metadata(out)["modelspec.architecture"] == "flux-1-dev/lora"


def test_fast_svd_extract_recovers_the_merged_lora_too(case):
    """--fast_svd (randomized SVD) recovers a low-rank ΔW as exactly as the full SVD."""
    if case.name != "flux":
        pytest.skip("one family suffices: the factorisation is shared")
    out = case.root / "extracted_fast.safetensors"
    assert main(["extract", "--model_org", str(case.base), "--model_tuned", str(case.merged), "--save_to", str(out),
                 "--dim", "4", "--clamp_quantile", "1", "--fast_svd"]) == 0
    original, extracted = load_lora(case.lora), load_lora(out)
    for name, recovered in extracted.modules.items():
        expected = RATIO * original.modules[name].delta()
        assert torch.allclose(recovered.delta().reshape(expected.shape), expected, atol=2e-5), name


def test_randomized_factorisation_is_near_optimal_and_deterministic():
    from lorakit.tools.svd import factorise

    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(96, 96, generator=g))[0]
    v = torch.linalg.qr(torch.randn(160, 96, generator=g))[0]
    delta = (u * torch.logspace(0, -3, 96)) @ v.T + 1e-4 * torch.randn(96, 160, generator=g)
    exact = factorise(delta, 8)
    fast = factorise(delta, 8, randomized=True)
    residual = lambda f: torch.linalg.norm(delta - f.up @ f.down)  # noqa: E731
    assert fast.rank == 8 and float(residual(fast)) <= 1.01 * float(residual(exact))
    again = factorise(delta, 8, randomized=True)
    assert torch.equal(fast.up, again.up) and torch.equal(fast.down, again.down)


# ------------------------------------------------------------------------------------------ LoRA-only tools


@pytest.mark.parametrize("name,build", [("sdxl", build_tiny_sdxl), ("sd3", lambda: build_tiny_sd3(0, "sd3.5m")), ("flux", build_tiny_flux)])
def test_every_layer_a_file_may_name_is_a_known_module_name(name, build):
    """The key layouts accept every kohya name the family's trainer can produce (embedders, T5, convs included)."""
    from lorakit.families.registry import guess_lora_family

    family = get_family(name)
    with model_targets(family, build()) as targets:
        assert len(targets) > 20
        unknown = [n for n in targets if family.lora_layout.kohya_to_path(n) is None]
    assert not unknown
    assert guess_lora_family(list(targets)) == name


def test_resize_is_the_best_lower_rank_fit(case):
    out = case.root / "resized.safetensors"
    assert main(["resize", "--model", str(case.lora), "--save_to", str(out), "--new_rank", "2", "--new_conv_rank", "1"]) == 0
    original, resized = load_lora(case.lora), load_lora(out)
    assert resized.modules.keys() == original.modules.keys()
    for name, module in original.modules.items():
        target = 1 if module.is_spatial else 2
        assert resized.modules[name].rank == target
        full = module.delta().reshape(module.up.shape[0], -1)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :target] * s[:target]) @ vh[:target]
        assert torch.allclose(resized.modules[name].delta().reshape(best.shape), best, atol=1e-5), name
    assert file_metadata(out)["ss_network_dim"] == "2"


def test_concat_merge_of_two_loras_is_the_exact_sum(case):
    other = case.root / "other.safetensors"
    save_lora_file(random_network(case.family, case.comps, case.cfg, seed=9).state_dict_kohya(), other)
    out = case.root / "concat.safetensors"
    args = ["merge", "--save_to", str(out), "--models", str(case.lora), str(other), "--ratios", "0.6", "-0.3", "--concat"]
    assert main(args) == 0
    a, b, merged = load_lora(case.lora), load_lora(other), load_lora(out)
    assert merged.modules.keys() == a.modules.keys()
    for name, module in merged.modules.items():
        expected = 0.6 * a.modules[name].delta() - 0.3 * b.modules[name].delta()
        assert torch.allclose(module.delta().reshape(expected.shape), expected, atol=1e-5), name
    expected_module = {"sdxl": "networks.lora", "sd3": "networks.lora_sd3", "flux": "networks.lora_flux"}[case.name]
    assert file_metadata(out)["ss_network_module"] == expected_module


# ------------------------------------------------------------------------------------------ convert


def test_convert_round_trips_exactly(case):
    """kohya -> diffusers -> kohya: bit for bit with --keep_alpha; the same ΔW when alpha is folded into lora_B."""
    original, _ = load_lora_file(case.lora)
    kept, folded = case.root / "peft_kept.safetensors", case.root / "peft_folded.safetensors"
    back_kept, back_folded = case.root / "back_kept.safetensors", case.root / "back_folded.safetensors"
    assert main(["convert", "--model", str(case.lora), "--save_to", str(kept), "--to", "diffusers", "--keep_alpha"]) == 0
    assert main(["convert", "--model", str(case.lora), "--save_to", str(folded), "--to", "peft"]) == 0
    peft, _ = load_lora_file(folded)
    assert all(".lora_A." in k or ".lora_B." in k for k in peft)
    expected_key = {
        "sdxl": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "sd3": "transformer.transformer_blocks.0.attn.to_k.lora_B.weight",
        "flux": "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
    }[case.name]
    assert expected_key in peft
    assert any(k.endswith(".alpha") for k in load_lora_file(kept)[0])
    assert main(["convert", "--model", str(kept), "--save_to", str(back_kept), "--to", "kohya"]) == 0
    assert main(["convert", "--model", str(folded), "--save_to", str(back_folded), "--to", "kohya"]) == 0
    restored, _ = load_lora_file(back_kept)
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original), [k for k in original if not torch.equal(restored[k], original[k])]
    a, b = load_lora(case.lora), load_lora(back_folded)
    assert a.modules.keys() == b.modules.keys()
    for name, module in a.modules.items():
        expected = module.delta()
        got = b.modules[name].delta().reshape(expected.shape)
        assert float((got - expected).norm() / expected.norm()) < 1e-6, name


def _pipeline(case, comps):
    if case.name == "sdxl":
        return case.family.pipeline(comps)
    if case.name == "sd3":
        from lorakit.families.sd3.tiny import pipeline_of

        return pipeline_of(comps)
    return case.family.pipeline(comps)


def test_diffusers_loads_the_converted_file_and_matches_our_merge(case):
    from lorakit.tools.merge import merge_into_model

    folded = case.root / "consumer.safetensors"
    assert main(["convert", "--model", str(case.lora), "--save_to", str(folded), "--to", "diffusers"]) == 0
    ours = {"sdxl": build_tiny_sdxl, "sd3": lambda: build_tiny_sd3(0, "sd3.5m"), "flux": build_tiny_flux}[case.name]()
    lora = load_lora(case.lora)
    merge_into_model(ours, lora.family, [lora], [1.0])
    theirs = {"sdxl": build_tiny_sdxl, "sd3": lambda: build_tiny_sd3(0, "sd3.5m"), "flux": build_tiny_flux}[case.name]()
    base = case.forward(theirs)
    pipe = _pipeline(case, theirs)
    pipe.load_lora_weights(str(folded), adapter_name="converted")
    denoiser = pipe.unet if case.name == "sdxl" else pipe.transformer
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if case.name != "flux" else [pipe.text_encoder, None]
    loaded = case.forward(SimpleNamespace(denoiser=denoiser, text_encoders=encoders))
    for theirs_out, ours_out, plain in zip(loaded, case.forward(ours), base):
        assert (ours_out - plain).abs().max() > 1e-3
        assert (theirs_out - ours_out).abs().max() < 1e-4


def test_flux_diffusers_folder_to_bfl_file(tmp_path):
    from safetensors.torch import load_file

    from lorakit.families.flux.tiny import save_pipeline_folder

    comps = build_tiny_flux(0)
    folder = save_pipeline_folder(comps, tmp_path / "diffusers")
    reference = save_bfl_files(comps, tmp_path / "bfl")["flux1"]
    out = tmp_path / "flux1_converted.safetensors"
    assert main(["convert", "--flux_diffusers_to_bfl", str(folder), "--save_to", str(out)]) == 0
    ours, theirs = load_file(str(out)), load_file(str(reference))
    assert ours.keys() == theirs.keys() and "double_blocks.0.img_attn.qkv.weight" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["convert", "--flux_diffusers_to_bfl", str(tmp_path / "nowhere"), "--save_to", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_names_the_family_and_its_loaders(case, capsys):
    import json

    peft = case.root / "inspect_peft.safetensors"
    assert main(["convert", "--model", str(case.lora), "--save_to", str(peft), "--to", "diffusers"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(case.lora), str(peft), "--json"]) == 0
    out = capsys.readouterr().out
    decoder = json.JSONDecoder()
    kohya, end = decoder.raw_decode(out)
    diffusers, _ = decoder.raw_decode(out[end:].lstrip())
    assert kohya["family"] == diffusers["family"] == case.name
    assert (kohya["layout"], diffusers["layout"]) == ("kohya", "diffusers")
    expected = {  # peers.md §4.2 and §4.2.1
        "sdxl": ("yes", "yes (converted on load)", "no",
                 "partly: its U-Net attention projections (96 of 207 modules) are dropped ('lora key not loaded')"),
        "sd3": ("no (A1111 1.10+ reads SD3 only in the diffusers layout; Forge has no SD3)", "no (convert: lorakit lora convert --to diffusers)",
                "A1111 1.10+ only (Forge has no SD3)", "yes"),
        "flux": ("Forge only (A1111 has no FLUX)", "yes (converted on load)", "Forge only (A1111 has no FLUX)", "yes"),
    }[case.name]
    got = (kohya["loaders"]["A1111/Forge"], kohya["loaders"]["diffusers"], diffusers["loaders"]["A1111/Forge"], diffusers["loaders"]["ComfyUI"])
    assert got == expected


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_name_the_file_and_key_and_write_nothing(case, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    model_args = list(case.model_args)
    if case.name == "flux":  # the merged CLIP-L would go here
        model_args[-1] = str(tmp_path / "clip.safetensors")
    base = ["merge", *model_args, "--save_to", str(out)]

    def refused(tensors, *fragments, metadata=None, extra=()):
        path = tmp_path / "bad.safetensors"
        save_lora_file(tensors, path, metadata or {})
        assert main([*base, "--models", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "bad.safetensors" in err and all(f in err for f in fragments), err
        assert len(err.strip().splitlines()) == 1

    tensors, _ = load_lora_file(case.lora)
    # a LoRA of another family than the model
    other = "lora_unet_double_blocks_0_img_attn_qkv" if case.name == "sdxl" else "lora_unet_input_blocks_4_1_proj_in"
    version = "flux1" if case.name == "sdxl" else "sdxl_base_v1-0"
    refused({f"{other}.lora_down.weight": torch.zeros(2, 8), f"{other}.lora_up.weight": torch.zeros(8, 2)}, other,
            metadata={"ss_base_model_version": version})
    # a module with a valid name the model does not have, and a factor shape that does not fit
    fused = {"sdxl": "lora_unet_input_blocks_4_1_proj_in", "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv",
             "flux": "lora_unet_double_blocks_0_img_attn_qkv"}[case.name]
    missing = {"sdxl": "lora_unet_input_blocks_7_1_proj_in", "sd3": "lora_unet_joint_blocks_9_x_block_attn_qkv",
               "flux": "lora_unet_double_blocks_7_img_attn_qkv"}[case.name]
    renamed = {k.replace(fused, missing): v for k, v in tensors.items()}
    refused(renamed, missing, "does not have")
    wrong = dict(tensors)
    wrong[f"{fused}.lora_up.weight"] = torch.zeros(wrong[f"{fused}.lora_up.weight"].shape[0] + 1, 4)
    refused(wrong, fused, "does not fit")
    # an unknown key
    refused({**tensors, "lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8)}, "lora_unet_no_such_layer")
    # ratios that do not match the files
    assert main([*base, "--models", str(case.lora), "--ratios", "0.5", "0.5"]) == 2
    assert "--ratios" in capsys.readouterr().err
    if case.name == "flux":  # a text-encoder LoRA needs --clip_l
        assert main(["merge", case.model_args[0], case.model_args[1], "--save_to", str(out), "--models", str(case.lora)]) == 2
        assert "--clip_l" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "clip.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "bad.safetensors"]


# ------------------------------------------------------------------------------------------ FLUX specifics


def test_flux_fp8_transformer_merges_in_float32(tmp_path):
    """A float8_e4m3fn BFL file (as distributed) is read, merged in --precision and saved in --save_precision."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lorakit.checkpoint_io import write_safetensors_atomic

    comps = build_tiny_flux(0)
    files = save_bfl_files(comps, tmp_path)
    with safe_open(str(files["flux1"]), "pt") as f:
        metadata = f.metadata()
    state = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in load_file(str(files["flux1"])).items()}
    fp8 = tmp_path / "flux1_fp8.safetensors"
    write_safetensors_atomic(state, fp8, metadata)
    lora = tmp_path / "lora.safetensors"
    save_lora_file(random_network(FluxFamily(), comps, net_cfg(unet_only=True)).state_dict_kohya(), lora)
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--flux_model", str(fp8), "--save_to", str(out), "--models", str(lora), "--ratios", str(RATIO),
            "--save_precision", "bf16", "--mem_eff_load_save", "--loading_device", "cpu", "--working_device", "cpu"]
    assert main(args) == 0
    assert load_file(str(out))["double_blocks.0.img_attn.qkv.weight"].dtype == torch.bfloat16
    base, merged = load_base_model(str(fp8), family="flux"), load_base_model(str(out), family="flux")
    with model_targets(get_family("flux"), base) as before, model_targets(get_family("flux"), merged) as after:
        for name, module in load_lora(lora).modules.items():
            expected = (before[name].weight() + RATIO * module.delta()).to(torch.bfloat16).float()
            assert torch.allclose(after[name].weight(), expected, atol=1e-6), name


def test_flux_converter_splits_and_fuses_independent_pairs():
    """Three independent q/k/v pairs fuse into a block-diagonal rank-3r module (exact ΔW per part) and split back."""
    from lorakit.families.flux.lora_convert import diffusers_to_kohya, kohya_to_diffusers

    gen = torch.Generator().manual_seed(0)
    width, rank = 8, 2
    parts = ("to_q", "to_k", "to_v")
    state = {}
    for index, part in enumerate(parts):
        state[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = torch.randn(rank, width, generator=gen)
        state[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = torch.randn(width, rank, generator=gen)
        state[f"transformer.transformer_blocks.0.attn.{part}.alpha"] = torch.tensor(float(index + 1))
    kohya, _ = diffusers_to_kohya(state)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], float(kohya[f"{name}.alpha"])
    assert down.shape == (3 * rank, width) and up.shape == (3 * width, 3 * rank)
    fused_delta = (alpha / (3 * rank)) * up @ down
    for index, part in enumerate(parts):
        a, b = state[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"], state[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"]
        expected = ((index + 1) / rank) * b @ a
        assert torch.allclose(fused_delta[index * width:(index + 1) * width], expected, atol=1e-5)
    split, _ = kohya_to_diffusers(kohya)
    for index, part in enumerate(parts):
        path = f"transformer.transformer_blocks.0.attn.{part}"
        assert split[f"{path}.lora_A.weight"].shape == (rank, width)  # the block-diagonal form splits into the small pairs
        expected = ((index + 1) / rank) * state[f"{path}.lora_B.weight"] @ state[f"{path}.lora_A.weight"]
        assert torch.allclose(split[f"{path}.lora_B.weight"] @ split[f"{path}.lora_A.weight"], expected, atol=1e-5)


def test_folders_are_merged_into_folders(tmp_path):
    """SDXL and FLUX diffusers folders in, diffusers folders out, equal to the single-file merge."""
    from lorakit.families.flux.tiny import save_pipeline_folder
    from lorakit.families.sdxl.tiny import save_sdxl_diffusers_folder

    for name, comps, save, family, cfg, option in (
        ("sdxl", build_tiny_sdxl(0), save_sdxl_diffusers_folder, StableDiffusionXLFamily(), net_cfg(), "--sd_model"),
        ("flux", build_tiny_flux(0), save_pipeline_folder, FluxFamily(), net_cfg(), "--flux_model"),
    ):
        folder, out = tmp_path / f"{name}_in", tmp_path / f"{name}_out"
        save(comps, folder)
        lora = tmp_path / f"{name}_lora.safetensors"
        save_lora_file(random_network(family, comps, cfg).state_dict_kohya(), lora)
        assert main(["merge", option, str(folder), "--save_to", str(out), "--models", str(lora), "--ratios", str(RATIO)]) == 0
        assert (out / "model_index.json").is_file()
        merged, base = load_base_model(str(out), family=name), load_base_model(str(folder), family=name)
        forward = sdxl_forward if name == "sdxl" else flux_forward
        expected = forward(base)
        network = bypass(family, base, cfg, lora)
        for ours, reference, plain in zip(forward(merged), forward(base), expected):
            assert (reference - plain).abs().max() > 1e-3
            assert torch.allclose(ours, reference, atol=1e-4), name
        network.restore()


def test_flux_diffusers_named_file_merges_like_the_bfl_file(tmp_path, capsys):
    """`--diffusers` (sd-scripts' flux_merge_lora.py): a diffusers-named transformer file in and out."""
    from safetensors.torch import load_file

    from lorakit.families.flux.model_files import save_transformer_file

    comps = build_tiny_flux(0)
    files = save_bfl_files(comps, tmp_path)
    named = tmp_path / "flux1_diffusers_names.safetensors"
    save_transformer_file(comps.denoiser, named, layout="diffusers")
    lora = tmp_path / "lora.safetensors"
    save_lora_file(random_network(FluxFamily(), comps, net_cfg(unet_only=True)).state_dict_kohya(), lora)
    outs = {}
    for name, source, extra in (("bfl", files["flux1"], []), ("diffusers", named, ["--diffusers"])):
        outs[name] = tmp_path / f"merged_{name}.safetensors"
        assert main(["merge", "--flux_model", str(source), "--save_to", str(outs[name]), "--models", str(lora), *extra]) == 0
    assert "transformer_blocks.0.attn.to_q.weight" in load_file(str(outs["diffusers"]))
    a = load_base_model(str(outs["bfl"]), family="flux").denoiser.state_dict()
    b = load_base_model(str(outs["diffusers"]), family="flux").denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # convert's --src is checked against the file
    assert main(["convert", "--model", str(lora), "--src", "ai-toolkit", "--to", "kohya", "--save_to", str(tmp_path / "x.safetensors")]) == 2
    assert "kohya layout" in capsys.readouterr().err


def test_flux_schnell_files_say_schnell(tmp_path):
    """FLUX.1 dev and schnell LoRAs share ss_base_model_version "flux1"; the ModelSpec architecture tells them apart:
    an extraction from a schnell model, and a merge of schnell LoRAs, say flux-1-schnell."""
    from safetensors.torch import load_file, save_file

    files = save_bfl_files(build_tiny_flux(0, guidance_embeds=False), tmp_path / "schnell")
    state = load_file(str(files["flux1"]))
    key = next(k for k in state if k.endswith("img_attn.qkv.weight"))
    state[key] = state[key] + 0.01 * torch.randn_like(state[key])
    tuned = tmp_path / "tuned.safetensors"
    save_file(state, str(tuned), metadata=file_metadata(files["flux1"]))  # the tiny model's config travels with it
    extracted, merged = tmp_path / "extracted.safetensors", tmp_path / "merged.safetensors"
    assert main(["extract", "--model_org", str(files["flux1"]), "--model_tuned", str(tuned), "--save_to", str(extracted),
                 "--dim", "2", "--flux"]) == 0
    assert main(["merge", "--models", str(extracted), str(extracted), "--ratios", "0.5", "0.5", "--save_to", str(merged)]) == 0
    for path in (extracted, merged):
        meta = file_metadata(path)
        assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["ss_base_model_version"] == "flux1", path.name

"""Builders shared by several test files: tiny checkpoints on disk and small DreamBooth folders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from lorakit.families.common.ldm_keys import save_sd_single_file
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder


def write_tiny_checkpoints(root: Path, version: str) -> dict[str, Path]:
    """The same tiny model as a diffusers folder, a single .safetensors and a single .ckpt (LDM layout)."""
    comps = build_tiny_sd(version, seed=0)
    paths = {"folder": root / f"{version}_diffusers", "safetensors": root / f"{version}.safetensors", "ckpt": root / f"{version}.ckpt"}
    save_sd_diffusers_folder(comps, paths["folder"])
    save_sd_single_file(comps, paths["safetensors"], fmt="safetensors")
    save_sd_single_file(comps, paths["ckpt"], fmt="ckpt")
    return paths


def write_dreambooth_folder(root: Path, *, count: int = 4, size: int = 64, repeats: int = 2, name: str = "sks toy") -> Path:
    """`root/<repeats>_<name>/` with simple two-colour images and a caption file for each."""
    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True)
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]
    for index in range(count):
        image = Image.new("RGB", (size, size), colours[index % len(colours)])
        image.paste((255, 255, 255), (size // 4, size // 4, size // 2 + index * 2, size // 2 + index * 2))
        image.save(folder / f"img_{index:03d}.png")
        (folder / f"img_{index:03d}.caption").write_text(f"sks toy, a square number {index}", encoding="utf-8")
    return root


def write_resume_world(root: Path) -> dict[str, Path]:
    """A tiny SD 1.5 folder and a 4-image DreamBooth folder (2 repeats): the world the resume tests train in."""
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), root / "model")
    return {"model": root / "model", "data": write_dreambooth_folder(root / "data")}


def resume_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """6 steps at batch 2 over 4 images x 2 repeats: 4 steps per epoch, so a resume at step 3 continues mid-epoch
    and crosses an epoch; dropout makes the step read the global RNG, cosine makes the LR schedule matter."""
    return [
        f"--pretrained_model_name_or_path={world['model']}", f"--train_data_dir={world['data']}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora", "--network_dim=4",
        "--network_alpha=2", "--network_dropout=0.1", "--max_train_steps=6", "--learning_rate=1e-3", "--seed=3",
        "--train_batch_size=2", "--lr_scheduler=cosine", *extra,
    ]


def network_options(module: str, *args: str, dim: int = 4, alpha: float = 2.0, **extra) -> SimpleNamespace:
    """The network options `build_network` reads, as `lorakit train` would parse them (`args` = --network_args)."""
    values = dict(a.split("=", 1) for a in args)
    base = dict(
        network_module=module, network_dim=dim, network_alpha=alpha, network_dropout=None, network_args=list(args) or None,
        network_kwargs=lambda: dict(values), network_weights=None, network_train_unet_only=False,
        network_train_text_encoder_only=False,
    )
    base.update(extra)
    return SimpleNamespace(**base)


# ---------------------------------------------------------------------------------------------------------
# diffusers as an independent reader of our LoRA files
# ---------------------------------------------------------------------------------------------------------

CONSUMER_PROMPT = "a red square on a blue background"


def spec_of(family, options):
    """The `TargetSpec` the training options in `options` (a namespace with the network fields) describe."""
    from lorakit.adapters.spec import make_target_spec

    args = options.network_kwargs() if getattr(options, "network_args", None) else {}
    return make_target_spec(
        family, module=getattr(options, "network_module", None), rank=getattr(options, "network_dim", None),
        alpha=getattr(options, "network_alpha", None), dropout=getattr(options, "network_dropout", None), args=args,
        train_unet=not getattr(options, "network_train_text_encoder_only", False),
        train_text_encoder=not getattr(options, "network_train_unet_only", False),
        weights=getattr(options, "network_weights", None),
    )


def family_args_of(family, options):
    """The family's own parsed --network_args of the options (problems raise ConfigError)."""
    return spec_of(family, options).family_args


def build_from_options(options, family, comps, device):
    """`build_network` for the network the options describe, with its --network_weights loaded as training loads them."""
    from lorakit.adapters.factory import build_network
    from lorakit.adapters.formats import load_lora_file

    spec = spec_of(family, options)
    network = build_network(spec, family, comps, device)
    if spec.weights:
        network.load_kohya_state_dict(load_lora_file(spec.weights)[0], source=spec.weights)
    return network


def targets_of(family, comps, options):
    """The family's adapter targets for the network the options describe."""
    return family.adapter_targets(comps, spec_of(family, options))


def tool_options(network_args: dict[str, str], *, unet_only: bool, dim: int = 1):
    """The network options the LoRA tools list a model's layers with (rank `dim`, alpha = rank)."""
    args = [f"{k}={v}" for k, v in network_args.items()] or None
    return SimpleNamespace(network_dim=dim, network_alpha=float(dim), network_args=args, network_kwargs=lambda: dict(network_args),
                           network_train_unet_only=unet_only, network_train_text_encoder_only=False)


def optimizer_groups(cfg, network, family=None, spec_family=None):
    """The optimizer groups a run with options `cfg` gives `network` (built for `family`; None: a family with one
    text-encoder LR and no U-Net blocks, the options read as `spec_family`'s)."""
    from lorakit.families.base import ModelFamily
    from lorakit.training.network_trainable import NetworkTrainable

    family = family or ModelFamily()
    return NetworkTrainable(network, spec_of(spec_family or family, cfg), family, True).parameter_groups(cfg)


def lora_options(conv: bool, unet_only: bool = False, te_only: bool = False):
    """The `networks.lora` options a family's adapter_targets reads: LierLa, or C3Lier with `conv`."""
    from types import SimpleNamespace

    args = ["conv_dim=4", "conv_alpha=2"] if conv else None
    return SimpleNamespace(
        network_dim=4, network_alpha=2.0, network_args=args,
        network_kwargs=lambda: dict(a.split("=", 1) for a in (args or [])),
        network_train_unet_only=unet_only, network_train_text_encoder_only=te_only,
    )


def random_network(family, comps, cfg, seed: int):
    """A LoRANetwork on `family`'s targets with random factors, large enough that a dropped or mis-mapped
    module changes the image visibly."""
    import torch

    from lorakit.adapters.network import LoRANetwork

    network = LoRANetwork(targets_of(family, comps, cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in network.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return network


def render(pipe, prompt: str = CONSUMER_PROMPT):
    """Two seeded 64x64 steps of a diffusers pipeline, as a tensor."""
    import torch

    out = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


def load_local_pipeline(pipeline_class, path, **kwargs):
    pipe = pipeline_class.from_pretrained(path, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_round_trip(load_pipeline, pipeline_dir, family, text_encoders: tuple[str, ...], cfg, lora_file, metadata):
    """The same random LoRA merged by us and loaded by diffusers' `load_lora_weights` from our kohya file.

    Returns a namespace with `state` (the kohya tensors saved), `theirs` (the diffusers pipeline with the file
    loaded) and the images `base`, `merged` (ours) and `loaded` (diffusers')."""
    from types import SimpleNamespace

    from lorakit.adapters.formats import save_lora_file

    ours = load_pipeline(pipeline_dir)
    comps = SimpleNamespace(denoiser=ours.unet, text_encoders=[getattr(ours, name) for name in text_encoders])
    network = random_network(family, comps, cfg, seed=3)
    state = network.state_dict_kohya()
    save_lora_file(state, lora_file, metadata)
    base = render(ours)
    network.merge_to_base()
    merged = render(ours)

    theirs = load_pipeline(pipeline_dir)
    theirs.load_lora_weights(str(lora_file), adapter_name="ours")
    return SimpleNamespace(state=state, theirs=theirs, base=base, merged=merged, loaded=render(theirs))

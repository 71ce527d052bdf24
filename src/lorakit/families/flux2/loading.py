"""Load FLUX.2 [klein] 4B/9B offline: a diffusers Flux2KleinPipeline folder, or the single files the community
distributes (as musubi-tuner's `flux_2_train_network.py` takes them).

The transformer comes with `--pretrained_model_name_or_path` (`flux2-klein-base-4b.safetensors`, BFL names, with
or without ComfyUI's `model.diffusion_model.` prefix), the Qwen3 text encoder with `--text_encoder` (transformers
layout with or without its `model.` level, one file or the first shard of a split one, as musubi-tuner and
ComfyUI's `qwen_3_4b.safetensors` have it) and the autoencoder with `--vae` (`ae.safetensors` of FLUX.2, BFL
layout). The Qwen3 tokenizer is read from local files only: beside the text encoder file, in a `tokenizer/`
folder there, or in the pipeline folder. FLUX.2 [dev] (Mistral text encoder) is refused with a clear message.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
)
from torch import nn
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from lorakit.checkpoint_io import first_line, read_checkpoint
from lorakit.errors import CheckpointError
from lorakit.families.base import Components
from lorakit.families.common.headers import class_name, safetensors_keys
from lorakit.families.common.ldm_keys import ldm_to_vae
from lorakit.families.common.module_io import (
    assign_weights,
    embedded_config,
    from_pretrained,
    read_json,
    reject_checkpoint,
)
from lorakit.families.flux2 import bfl_keys

_PACKAGE = resources.files("lorakit") / "families" / "flux2"
KLEIN_PIPELINES = ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline")
TRANSFORMER_CLASS = "Flux2Transformer2DModel"
DEV_TEXT_WIDTH = 15360  # FLUX.2 [dev] reads Mistral Small 3's stacked hidden states
TOKENIZER_DIRS = ("", "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
MISSING_TOKENIZER = (
    "no Qwen3 tokenizer found. FLUX.2 [klein] needs the Qwen3 tokenizer, offline: put its files (tokenizer.json, "
    "tokenizer_config.json, e.g. the tokenizer/ folder of the FLUX.2-klein diffusers repository) next to the "
    "--text_encoder file or in a tokenizer/ folder beside it, or pass a diffusers FLUX.2 [klein] folder"
)
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def bundled_config(name: str) -> dict[str, Any]:
    """A bundled real config: transformer_klein_4b/9b, qwen3_4b/8b, ae."""
    return json.loads((_PACKAGE / "configs" / f"{name}.json").read_text(encoding="utf-8"))


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2 [klein]'s scheduler: Euler on the flow, its pipeline sets the shift from the token and step counts."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


def is_flux2_source(path: str) -> bool:
    """Whether `path` is a FLUX.2 model, from a folder's class names or a `.safetensors` header only."""
    source = Path(path)
    if source.is_dir():
        return (class_name(source / "model_index.json").startswith("Flux2")
                or TRANSFORMER_CLASS in (class_name(source / "transformer" / "config.json"), class_name(source / "config.json")))
    keys = safetensors_keys(source)
    return keys is not None and bfl_keys.is_flux2_keys(keys)


def load_flux2_components(path: str, *, text_encoder: str | None = None, vae: str | None = None,
                          dtype: torch.dtype = torch.float32, text_encoders: bool = True) -> Components:
    """Transformer, autoencoder, Qwen3 and its tokenizer from a diffusers folder or the single files; every
    missing part is named with the option that provides it. Without `text_encoders` no Qwen3 and no tokenizer
    is built (every caption's outputs are cached)."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"{path}: FLUX.2 model file or folder not found (--pretrained_model_name_or_path)")
    for flag, value in (("--text_encoder", text_encoder), ("--vae", vae)):
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"{value}: file not found ({flag})")
    if source.is_dir() and (source / "model_index.json").is_file():
        parts = _load_pipeline_folder(source, dtype, skip_text=bool(text_encoder) or not text_encoders, skip_vae=bool(vae))
    else:
        parts = {"transformer": load_transformer_alone(str(source), dtype)}
    if text_encoder and text_encoders:
        parts["text_encoder"] = load_text_encoder_file(Path(text_encoder), dtype)
        parts["tokenizer"] = find_tokenizer(Path(text_encoder))
    if vae:
        parts["vae"] = load_ae_file(Path(vae), dtype)
    needed = (("--text_encoder", "text_encoder"), ("--vae", "vae")) if text_encoders else (("--vae", "vae"),)
    missing = [flag for flag, key in needed if key not in parts]
    if missing:
        raise CheckpointError(f"{path}: a FLUX.2 transformer file holds only the transformer; also pass {', '.join(missing)} "
                              "(as with musubi-tuner's flux_2_train_network.py), or pass a diffusers FLUX.2 [klein] folder")
    encoders, tokenizers = ([parts["text_encoder"].eval()], [parts["tokenizer"]]) if text_encoders else ([], [])
    return Components(parts["transformer"].eval(), parts["vae"].eval(), encoders, tokenizers, {"source": str(path)})


def _load_pipeline_folder(folder: Path, dtype: torch.dtype, *, skip_text: bool, skip_vae: bool) -> dict[str, Any]:
    pipeline = read_json(folder / "model_index.json").get("_class_name", "")
    if pipeline not in KLEIN_PIPELINES:
        raise CheckpointError(f"{folder}: this is a {pipeline or 'non-FLUX.2'} model folder, not FLUX.2 [klein] (4B/9B); "
                              "choose its family")
    parts: dict[str, Any] = {"transformer": _checked(_from_pretrained(Flux2Transformer2DModel, folder, "transformer", torch_dtype=dtype), folder)}
    if not skip_vae:
        parts["vae"] = _from_pretrained(AutoencoderKLFlux2, folder, "vae", torch_dtype=dtype)
    if not skip_text:
        parts["text_encoder"] = _from_pretrained(Qwen3ForCausalLM, folder, "text_encoder", dtype=dtype)
        parts["tokenizer"] = tokenizer_in(folder / "tokenizer")
        if parts["tokenizer"] is None:
            raise CheckpointError(f"{folder / 'tokenizer'}: {MISSING_TOKENIZER}")
    return parts


def _from_pretrained(cls, folder: Path, subfolder: str, **kwargs) -> nn.Module:
    return from_pretrained(cls, folder, subfolder, what=f"FLUX.2 {subfolder or 'transformer'}", **kwargs)


def _checked(transformer: Flux2Transformer2DModel, source: Path | str) -> Flux2Transformer2DModel:
    if transformer.config.joint_attention_dim == DEV_TEXT_WIDTH:
        raise CheckpointError(f"{source}: a FLUX.2 [dev] transformer (Mistral text encoder); lorakit trains FLUX.2 [klein] 4B/9B")
    return transformer


# ---------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------


def load_transformer_alone(path: str, dtype: torch.dtype = torch.float32) -> Flux2Transformer2DModel:
    """The transformer of a single file (BFL or diffusers names) or of a diffusers folder (the pipeline's or its
    `transformer/`)."""
    source = Path(path)
    if source.is_file():
        return load_transformer_file(source, dtype)
    subfolder = "transformer" if (source / "transformer" / "config.json").is_file() else ""
    if not (source / subfolder / "config.json").is_file():
        raise CheckpointError(f"{path}: not a diffusers FLUX.2 transformer folder (no config.json, no transformer/config.json)")
    return _checked(_from_pretrained(Flux2Transformer2DModel, source, subfolder, torch_dtype=dtype), source)


def load_transformer_file(file: Path, dtype: torch.dtype) -> Flux2Transformer2DModel:
    checkpoint = read_checkpoint(file)
    state = checkpoint.state_dict
    if not bfl_keys.is_flux2_keys(state):
        reject_checkpoint(checkpoint, "flux2", "expected a FLUX.2 [klein] transformer (double_stream_modulation_img.*)")
    if bfl_keys.DIFFUSERS_MARKER in state:
        config, weights = embedded_config(checkpoint, "transformer") or _real_config(state["context_embedder.weight"].shape[0]), state
    else:
        config = embedded_config(checkpoint, "transformer") or bfl_keys.transformer_config(state)
        weights = bfl_keys.bfl_to_diffusers(state, checkpoint.path)
    del state, checkpoint
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(config)
    _checked(model, file)
    assign_weights(model, weights, file=str(file), component="FLUX.2 transformer", dtype=dtype)
    return model


def _real_config(width: int) -> dict[str, Any]:
    return bundled_config("transformer_klein_9b" if width > 3072 else "transformer_klein_4b")


def shard_files(file: Path) -> list[Path]:
    """All shards of a split `.safetensors` (`model-00001-of-00002.safetensors`), or the file alone."""
    match = _SHARD.match(file.name)
    if not match:
        return [file]
    count = int(match["count"])
    shards = [file.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{file}: a split text encoder; its shard {missing[0]} is missing (--text_encoder)")
    return shards


def load_text_encoder_file(file: Path, dtype: torch.dtype) -> Qwen3Model:
    """Qwen3 (its decoder stack: FLUX.2 reads hidden states only) from one file or the first of its shards."""
    weights: dict[str, torch.Tensor] = {}
    config = None
    for shard in shard_files(file):
        checkpoint = read_checkpoint(shard)
        config = config or embedded_config(checkpoint, "text_encoder")
        weights.update({k.removeprefix("model."): v for k, v in checkpoint.state_dict.items() if not k.startswith("lm_head.")})
    if "embed_tokens.weight" not in weights or not any(k.startswith("layers.") for k in weights):
        raise CheckpointError(f"{file}: not a Qwen3 text encoder (no model.embed_tokens / model.layers.* weights) (--text_encoder)")
    hidden = int(weights["embed_tokens.weight"].shape[1])
    config = config or bundled_config("qwen3_8b" if hidden > 2560 else "qwen3_4b")
    with init_empty_weights():
        model = Qwen3Model(Qwen3Config.from_dict(config))
    assign_weights(model, weights, file=str(file), component="Qwen3 text encoder", dtype=dtype, extra_ok=True)
    return model


def tokenizer_in(folder: Path) -> Any | None:
    """The tokenizer saved in `folder`, or None where the folder holds no tokenizer files."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read the Qwen3 tokenizer in this folder ({first_line(exc)})") from None


def find_tokenizer(text_encoder: Path) -> Any:
    for sub in TOKENIZER_DIRS:
        tokenizer = tokenizer_in(text_encoder.parent / sub if sub else text_encoder.parent)
        if tokenizer is not None:
            return tokenizer
    raise CheckpointError(f"{text_encoder}: {MISSING_TOKENIZER}")


def load_ae_file(file: Path, dtype: torch.dtype) -> AutoencoderKLFlux2:
    """FLUX.2's autoencoder from `ae.safetensors` (BFL layout: LDM blocks, the quant convs inside the encoder and
    decoder, the latent BatchNorm statistics `bn.*`) or a diffusers-layout file."""
    checkpoint = read_checkpoint(file)
    config = embedded_config(checkpoint, "vae") or bundled_config("ae")
    state = checkpoint.state_dict
    if any(k.startswith("encoder.down_blocks.") for k in state):
        weights = state
    elif any(k.startswith("encoder.down.") for k in state):
        weights = ldm_to_vae({_ldm_quant_conv(k): v for k, v in state.items()}, config)
        weights.update({k: v for k, v in state.items() if k.startswith("bn.")})  # the LDM converter keeps no BatchNorm
    else:
        raise CheckpointError(f"{file}: not an autoencoder (no encoder.down.* weights) (--vae)")
    if "bn.running_mean" not in weights:
        raise CheckpointError(f"{file}: not FLUX.2's autoencoder (no bn.running_mean: its latent statistics) (--vae)")
    with init_empty_weights():
        model = AutoencoderKLFlux2.from_config(config)
    assign_weights(model, weights, file=str(file), component="FLUX.2 autoencoder", dtype=dtype, extra_ok=True)
    return model


def _ldm_quant_conv(key: str) -> str:
    """BFL keeps the quant convs inside the encoder and decoder; the LDM layout keeps them at the top."""
    for inner, top in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
        if key.startswith(inner):
            return top + key[len(inner):]
    return key

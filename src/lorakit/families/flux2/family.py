"""FLUX.2 [klein] 4B/9B (base and distilled): loading, conditioning, flow-matching prediction, LoRA targets and files.

Conditioning as diffusers' Flux2KleinPipeline and musubi-tuner's `flux_2_train_network.py`: the autoencoder's latent
cut into 2×2 patches and normalised by its BatchNorm statistics, packed into tokens with 4-axis positions
(`packing.py`); Qwen3's hidden states of layers 9, 18 and 27 (chat template, no thinking) stacked as the text
tokens; the timestep alone conditions the blocks (klein has no guidance embedding). `--timestep_sampling
flux_shift` is musubi-tuner's `flux2_shift`: the shift of FLUX.1's line over the packed token count. LoRA targets
are musubi-tuner's `networks.lora_flux_2` layers under BFL names, which ComfyUI and diffusers load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget
from lorakit.data.latent_files import LatentFileFormat
from lorakit.data.text_cache import CaptionCache, run_text_cache
from lorakit.data.text_files import TextFileFormat
from lorakit.errors import ConfigError
from lorakit.families.base import (
    BaseModelFacts,
    Components,
    InferenceDefaults,
    LoraHint,
    ModelFamily,
    ModelSource,
    TextConditioning,
)
from lorakit.families.common.bfl_lora_convert import BflLoraConverter
from lorakit.families.common.bfl_network_args import BflNetworkArgs
from lorakit.families.common.bfl_targets import block_targets, embedder_targets
from lorakit.families.common.flow_metadata import flow_sampling_metadata
from lorakit.families.common.layers import checkpoint_offloading_to_cpu, to_fp8
from lorakit.families.common.transformer_family import (
    BlockSwapFamily,
    clip_length_warnings,
    flow_family_problems,
    plan_double_single_swap,
)
from lorakit.families.flux2 import bfl_keys
from lorakit.families.flux2.lora_keys import LORA_LAYOUT
from lorakit.families.flux2.packing import (
    PATCH,
    bn_statistics,
    image_ids,
    pack,
    patchify,
    text_ids,
    unpack,
    unpatchify,
)
from lorakit.objectives.flow import (
    FlowObjective,
    apply_model_prediction_type,
    timesteps_to_sigmas,
)
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

MAX_LENGTH = 512  # the text length of the pipeline and of musubi-tuner
TEXT_LAYERS = (9, 18, 27)  # Qwen3 hidden states FLUX.2 [klein] reads
MODELSPEC_IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"  # musubi-tuner's IMPL_FLUX_2
_ATTENTION = re.compile(r"_attn_(qkv|proj)$")
BFL_BLOCK_CLASSES = {"DoubleStreamBlock", "SingleStreamBlock"}  # LyCORIS preset classes of the original model
BFL_ATTENTION_CLASS = "SelfAttention"
CONVERTER = BflLoraConverter(bfl_keys.lora_layer_table, (), LORA_LAYOUT, "FLUX.2")


def size_of(comps: Components) -> str:
    """`4b` or `9b`: the 9B's transformer is wider than the 4B's 3072 (the tiny test models count as 4B)."""
    config = comps.denoiser.config
    return "9b" if config.num_attention_heads * config.attention_head_dim > 3072 else "4b"


class Flux2Family(BlockSwapFamily, ModelFamily):
    """FLUX.2 [klein] with its Qwen3 text encoder and FLUX.2 autoencoder."""

    name = "flux2"
    title = "FLUX.2 [klein]"
    large_text_encoders = (0,)  # what --base_quant quantizes besides the denoiser
    default_network_module = "networks.lora_flux_2"  # musubi-tuner's module for FLUX.2
    lora_network_modules = ("networks.lora_flux_2",)
    bucket_step = 64
    all_layers_args = {"in_dims": "[1,1,1,1,1]"}
    oft_attention = _ATTENTION
    # diffusers' names are FLUX.2's own; kohya names are FLUX.1's without its modulation (metadata decides there)
    lora_hints = (LoraHint(10, ("attn.to_qkv_mlp_proj", "ff.linear_in", "ff_context.linear_in")),
                  LoraHint(30, ("lora_unet_double_blocks_", "lora_unet_single_blocks_")))
    version_prefixes = ("flux_2",)
    architecture_fragments = ("Flux.2",)
    inference = InferenceDefaults(steps=50, guidance_scale=4.0, resolution=1024)  # musubi-tuner's klein base defaults
    part_files = ("text_encoder", "vae")
    single_file_kinds = ("safetensors", "diffusers")  # "diffusers": the transformer alone under diffusers' names
    uses_own_scheduler = True
    webui_kohya = "no (A1111 has no FLUX.2)"
    webui_diffusers = "no (A1111 has no FLUX.2)"
    comfy_diffusers = "not checked (ComfyUI maps FLUX.2 LoRAs by BFL names: convert with --to kohya)"

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None
        self.size: str | None = None  # of the loaded model

    @property
    def latent_format(self) -> LatentFileFormat:
        # normalised latents at the VAE's resolution (`packing.py`), stored as they are
        return LatentFileFormat("_flux2.npz", True)

    @property
    def text_cache_format(self) -> TextFileFormat:
        # lorakit's own files (sd-scripts has no FLUX.2)
        return TextFileFormat("_flux2_te.npz", ("qwen3",), encoder_files=("text_encoder",))

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.flux2.loading import is_flux2_source

        return is_flux2_source(path)

    # ----------------------------------------------------------------------------------------- options

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        problems = super().option_problems(cfg, spec)
        if spec is not None and spec.family_args is not None and spec.family_args.train_t5xxl:
            problems.append("--network_args train_t5xxl: FLUX.2 has no T5")
        return problems + flow_family_problems(self.name, cfg)

    def option_warnings(self, cfg: Any) -> list[str]:
        warnings = clip_length_warnings(self.name, cfg)
        if not cfg.network_train_unet_only:
            warnings.append("the Qwen3 text encoder is not trained for FLUX.2 (as musubi-tuner's lora_flux_2): "
                            "only the transformer gets LoRA modules")
        return warnings

    def parse_network_args(self, args: Mapping[str, str], spec: TargetSpec) -> tuple[Any, list[str]]:
        return BflNetworkArgs.parse(args, spec.rank)

    # ----------------------------------------------------------------------------------------- loading

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self.text_cache = run_text_cache(cfg, text_cache)  # the text encoder never trains, so it can always be cached
        comps = self.load_model(self.training_source(cfg, self.text_cache))
        self.size = size_of(comps)
        if cfg.model_version and not cfg.model_version.endswith(self.size):
            raise ConfigError([f"--model_version {cfg.model_version}: {cfg.pretrained_model_name_or_path} is FLUX.2 [klein] "
                               f"{self.size.upper()}"])
        comps.extras.update({
            # the tiny test tokenizer stops at 64
            "max_length": min([MAX_LENGTH, *(t.model_max_length for t in comps.tokenizers[:1])]),
            "model_prediction_type": cfg.model_prediction_type,
            "cpu_offload_checkpointing": bool(cfg.cpu_offload_checkpointing),
        })
        self._check_block_swap(cfg, comps)
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.flux2.loading import (
            load_flux2_components,
            load_transformer_alone,
        )

        dtype = source.dtype or torch.float32
        if source.denoiser_only or (source.partial and not Path(source.path).is_dir()):
            comps = Components(load_transformer_alone(source.path, dtype).eval(), None, [None], [], {"source": source.path})
        else:
            comps = load_flux2_components(source.path, text_encoder=source.files.get("text_encoder"),
                                          text_encoders=source.text_encoders,
                                          vae=source.files.get("vae"), dtype=dtype)
        if source.fp8:
            layers = to_fp8(comps.denoiser)
            if source.fp8 == "all":
                layers += sum(to_fp8(encoder) for encoder in comps.text_encoders if encoder is not None)
            log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
        return comps

    @staticmethod
    def _check_block_swap(cfg: Any, comps: Components) -> None:
        """--blocks_to_swap, split as for FLUX.1 (N//2 double and 2·(N − N//2) single blocks), leaving two of each
        kind on the GPU."""
        swap = cfg.blocks_to_swap or 0
        if not swap:
            return
        plan_double_single_swap(comps, swap)

    # ----------------------------------------------------------------------------------------- training

    def objective(self, cfg: Any, comps: Components) -> FlowObjective:
        return FlowObjective.from_options(cfg, patch_size=PATCH)

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        """The latent's mean (as the pipeline and musubi-tuner), normalised per patched channel."""
        vae = comps.vae
        latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        patched = patchify(torch.nan_to_num(latents, nan=0.0))
        mean, std = bn_statistics(vae, patched)
        return unpatchify((patched - mean) / std)

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = comps.vae
        patched = patchify(latents.to(vae.dtype))
        mean, std = bn_statistics(vae, patched)
        return vae.decode(unpatchify(patched * std + mean)).sample

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """Qwen3's stacked hidden states (`clip_skip` does not apply)."""
        if self.text_cache is None:
            return TextConditioning(self.text_encoder_outputs(comps, captions))
        return TextConditioning(self.text_cache.outputs(captions, lambda texts: self.text_encoder_outputs(comps, texts)))

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """Qwen3's hidden states of layers 9, 18 and 27 side by side (`qwen3`), padded to the pipeline's length."""
        encoder, tokenizer = comps.text_encoders[0], comps.tokenizers[0]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False) for caption in captions]
        tokens = tokenizer(texts, padding="max_length", max_length=comps.extras["max_length"], truncation=True, return_tensors="pt")
        with torch.no_grad():
            output = encoder(input_ids=to_device(tokens.input_ids, encoder.device),
                             attention_mask=to_device(tokens.attention_mask, encoder.device), output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[k] for k in TEXT_LAYERS], dim=2)  # (B, L, 3, H)
        return {"qwen3": stacked.flatten(2)}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The transformer's velocity for the noisy latents, turned per --model_prediction_type."""
        self.prepare_block_swap(comps, None, noisy.device)  # once, with --blocks_to_swap
        transformer = comps.denoiser
        _, _, height, width = noisy.shape
        dtype = noisy.dtype
        context = text.tensors["qwen3"].to(dtype)
        sigmas = timesteps_to_sigmas(timesteps)
        guidance = None
        if transformer.config.guidance_embeds:  # distilled FLUX.2 [dev]-style models: musubi-tuner trains with 1.0
            guidance = torch.ones(noisy.shape[0], device=noisy.device, dtype=dtype)
        output = transformer(
            hidden_states=pack(noisy), encoder_hidden_states=context, timestep=sigmas.to(dtype),  # ×1000 inside
            img_ids=image_ids(height, width, noisy.device), txt_ids=text_ids(context.shape[1], noisy.device),
            guidance=guidance, return_dict=False,
        )[0]
        velocity = unpack(output, height, width)
        return apply_model_prediction_type(velocity, noisy, sigmas, comps.extras["model_prediction_type"])

    # ----------------------------------------------------------------------------------------- adapters

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        if not spec.train_unet:
            return []
        args: BflNetworkArgs = spec.family_args
        alpha = spec.alpha_option or None
        config = comps.denoiser.config
        rows = bfl_keys.lora_rows(config.num_layers, config.num_single_layers)
        return (block_targets(comps.denoiser, rows, args, alpha)
                + embedder_targets(comps.denoiser, bfl_keys.EMBEDDER_GROUPS, bfl_keys.TOP_LEVEL, args, alpha))

    def lycoris_denoiser_targets(self, comps: Components, spec: TargetSpec, preset_classes: set[str]) -> list[AdapterTarget]:
        """The layers LyCORIS' walk over the original model would pick for the preset, among the family's targets."""
        targets = self.adapter_targets(comps, spec)
        if preset_classes & BFL_BLOCK_CLASSES:
            return targets
        if BFL_ATTENTION_CLASS in preset_classes:
            return [t for t in targets if _ATTENTION.search(t.name)]
        return []

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        return []

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        if comps.extras.get("cpu_offload_checkpointing"):
            comps.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_offloading_to_cpu)
        else:
            comps.denoiser.enable_gradient_checkpointing()

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers Flux2KleinPipeline over these very modules, sampling with its own flow Euler scheduler."""
        from diffusers import Flux2KleinPipeline

        from lorakit.families.flux2.loading import flow_scheduler

        return Flux2KleinPipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                                  tokenizer=comps.tokenizers[0], transformer=comps.denoiser, is_distilled=False)

    def lora_to_diffusers(self, state, metadata, *, keep_alpha: bool = False):
        return CONVERTER.kohya_to_diffusers(state, metadata, keep_alpha=keep_alpha)

    def lora_from_diffusers(self, state, metadata):
        return CONVERTER.diffusers_to_kohya(state, metadata)

    def loader_support(self, style: str, algorithm: str, keys: list[str], **flags: Any) -> dict[str, str]:
        """As every family, except that sd-scripts has no FLUX.2 (its sibling musubi-tuner reads kohya files)."""
        support = super().loader_support(style, algorithm, keys, **flags)
        if style == "kohya":
            support["sd-scripts"] = "no (sd-scripts has no FLUX.2; musubi-tuner reads it)" if algorithm.startswith(("lora", "locon")) else "no"
        return support

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        """musubi-tuner's `ss_base_model_version` (`flux_2_klein_4b`/`_9b`) and sd-scripts' flow `ss_*` keys."""
        size = self.size or (cfg.model_version or "klein-4b")[-2:]
        return {
            "ss_base_model_version": f"flux_2_klein_{size}",
            "ss_v2": "False",
            **flow_sampling_metadata(cfg),
            "ss_model_prediction_type": str(cfg.model_prediction_type),
        }

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """musubi-tuner's ModelSpec: `Flux.2-klein-4b` / `Flux.2-klein-9b`, no prediction type."""
        size = "9b" if version and version.endswith("9b") else "4b"
        return BaseModelFacts(f"flux_2_klein_{size}", f"Flux.2-klein-{size}", MODELSPEC_IMPLEMENTATION, 1024, None)

    def version_of(self, source: ModelSource, comps: Components) -> str:
        return f"flux_2_klein_{size_of(comps)}"

    # ----------------------------------------------------------------------------------------- whole-model files

    def save_single_file(self, comps: Components, path: Path, kind: str) -> None:
        """The transformer alone, in BFL layout (`kind` "diffusers": under diffusers' names)."""
        from lorakit.families.flux2.model_files import save_transformer_file

        save_transformer_file(comps.denoiser, path, layout="diffusers" if kind == "diffusers" else "bfl")

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.checkpoint_io import save_pipeline_atomic

        if comps.vae is None or any(part is None for part in comps.text_encoders) or not comps.tokenizers:
            raise ConfigError([f"--save_to {path}: a diffusers folder needs the whole pipeline; this FLUX.2 model was read "
                               "from single files, so save it as .safetensors"])
        save_pipeline_atomic(self.pipeline(comps), path)

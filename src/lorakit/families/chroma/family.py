"""Chroma (Chroma1-Base/HD, lodestones): loading, conditioning, flow-matching prediction, LoRA targets and files.

Conditioning as sd-scripts' `flux_train_network.py --model_type chroma` and diffusers' ChromaPipeline: the FLUX
autoencoder's latent normalised as (z − shift)·scale and packed into 2×2 patches with (0, row, col) position ids;
T5-XXL's last hidden states (T5 run with its padding mask) as the text tokens, of which each caption keeps its own
and one padding token (`masking.py`); no CLIP-L, no pooled vector and no guidance embedding: the blocks'
modulation comes from the approximator fed the timestep alone. LoRA targets are `networks.lora_flux`'s BFL
layers without FLUX.1's modulation layers (`lora_unet_double_blocks_0_img_attn_qkv`, `…_single_blocks_0_linear1`,
`lora_te3_…` for T5 with `train_t5xxl=True`), the names ComfyUI and diffusers load.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.adapters.spec import TargetSpec
from lorakit.adapters.targets import AdapterTarget, RankChoice
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
    SeparatePart,
    TextConditioning,
)
from lorakit.families.chroma import bfl_keys
from lorakit.families.chroma.lora_keys import LORA_LAYOUT
from lorakit.families.chroma.masking import install_key_mask, trim_text
from lorakit.families.common.bfl_lora_convert import BflLoraConverter
from lorakit.families.common.bfl_network_args import BflNetworkArgs
from lorakit.families.common.bfl_packing import (
    PATCH,
    image_position_ids,
    pack_latents,
    unpack_latents,
)
from lorakit.families.common.bfl_targets import block_targets, embedder_targets, reg_ranked
from lorakit.families.common.flow_metadata import flow_sampling_metadata
from lorakit.families.common.layers import checkpoint_offloading_to_cpu, to_fp8
from lorakit.families.common.text_encoders import t5_targets
from lorakit.families.common.transformer_family import (
    BlockSwapFamily,
    ShiftScaleLatents,
    plan_double_single_swap,
    t5_family_problems,
    t5_family_warnings,
    trains_t5,
)
from lorakit.objectives.flow import (
    FlowObjective,
    apply_model_prediction_type,
    timesteps_to_sigmas,
)
from lorakit.transfer import to_device

log = logging.getLogger("lorakit")

T5_MAX_LENGTH = 512  # sd-scripts' default --t5xxl_max_token_length for a model that is not schnell
BASE_MODEL_VERSION = "chroma"  # sd-scripts' MODEL_VERSION_CHROMA
MODELSPEC_ARCHITECTURE = "chroma"  # sd-scripts' ARCH_FLUX_1_CHROMA
MODELSPEC_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"  # sd-scripts' IMPL_CHROMA
_ATTENTION = re.compile(r"_attn_(qkv|proj)$")
BFL_BLOCK_CLASSES = {"DoubleStreamBlock", "SingleStreamBlock"}  # LyCORIS preset classes of the original model
BFL_ATTENTION_CLASS = "SelfAttention"
CONVERTER = BflLoraConverter(bfl_keys.lora_layer_table, ("lora_te3",), LORA_LAYOUT, "Chroma", t5_prefix="lora_te3")


class ChromaFamily(ShiftScaleLatents, BlockSwapFamily, ModelFamily):
    """Chroma with T5-XXL and the FLUX autoencoder."""

    name = "chroma"
    title = "Chroma"
    large_text_encoders = (0,)  # what --base_quant quantizes besides the denoiser
    default_network_module = "networks.lora_flux"  # sd-scripts trains Chroma with FLUX's LoRA module
    lora_network_modules = ("networks.lora_flux",)
    oft_network_modules = ("networks.oft_flux",)
    bucket_step = 64
    all_layers_args = {"in_dims": "[1,1,1,1,1]", "train_t5xxl": "True"}
    oft_attention = _ATTENTION
    # FLUX.1 files name the same layers (and more): names alone are read as FLUX.1's, metadata says Chroma
    lora_hints = (LoraHint(30, ("lora_unet_double_blocks_", "lora_unet_single_blocks_")),)
    version_prefixes = ("chroma",)
    architecture_fragments = ("chroma",)
    inference = InferenceDefaults(steps=40, guidance_scale=4.0, resolution=1024)  # sd-scripts' Chroma samples: --l 4.0
    part_files = ("t5xxl", "ae")
    separate_parts = {"t5xxl": SeparatePart(0, "lora_te3", "T5-XXL")}
    single_file_kinds = ("safetensors", "diffusers")  # "diffusers": the transformer alone under diffusers' names
    uses_own_scheduler = True
    webui_kohya = "no (A1111 and Forge have no Chroma)"
    webui_diffusers = "no (A1111 and Forge have no Chroma)"
    diffusers_ignores = {"lora_te3_": "T5 (lora_te3)"}

    # T5 modules: ComfyUI maps them under its own name (what lorakit writes), not diffusers-style ones; diffusers
    # ignores T5 LoRA modules whatever their names
    comfy_drops = {r"^text_encoder\.encoder\.": "T5 modules under diffusers-style names"}
    diffusers_skips = {r"^(text_encoders\.t5xxl\.|text_encoder\.encoder\.)": "T5 modules"}

    def __init__(self) -> None:
        self.text_cache: CaptionCache | None = None

    @property
    def latent_format(self) -> LatentFileFormat:
        # the FLUX autoencoder's scaled latents, stored as they are (sd-scripts' FLUX cache files, its own suffix)
        return LatentFileFormat("_chroma.npz", True)

    @property
    def text_cache_format(self) -> TextFileFormat:
        # the keys of sd-scripts' FLUX files without CLIP-L's `l_pooled`, under a name of its own (as its latents),
        # so that a folder trained with both families keeps one file of each
        return TextFileFormat("_chroma_te.npz", ("t5_out", "txt_ids", "t5_attn_mask"), switches=("apply_t5_attn_mask",),
                              settings=("t5xxl_max_token_length",), encoder_files=("t5xxl",))

    @property
    def lora_layout(self):
        return LORA_LAYOUT

    def owns_checkpoint(self, path: str) -> bool:
        from lorakit.families.chroma.loading import is_chroma_source

        return is_chroma_source(path)

    # ----------------------------------------------------------------------------------------- options

    def option_problems(self, cfg: Any, spec: TargetSpec | None = None) -> list[str]:
        problems = super().option_problems(cfg, spec)
        if getattr(cfg, "clip_l", None):
            problems.append("--clip_l: Chroma has no CLIP-L (remove the option, as with sd-scripts' --model_type chroma)")
        return problems + t5_family_problems(self.name, cfg, spec)

    def option_warnings(self, cfg: Any) -> list[str]:
        warnings = t5_family_warnings(self.name, cfg)
        if cfg.guidance_scale:
            warnings.append(f"--guidance_scale {cfg.guidance_scale} is not used: Chroma computes its modulation with guidance 0 "
                            "(what sd-scripts' --guidance_scale=0.0 asks for)")
        return warnings

    def parse_network_args(self, args: Mapping[str, str], spec: TargetSpec) -> tuple[Any, list[str]]:
        return BflNetworkArgs.parse(args, spec.rank)

    # ----------------------------------------------------------------------------------------- loading

    def load(self, cfg: Any, spec: TargetSpec | None = None, text_cache: CaptionCache | None = None) -> Components:
        self.text_cache = run_text_cache(cfg, text_cache)
        comps = self.load_model(self.training_source(cfg, self.text_cache))
        # the tiny test tokenizer stops at 32
        default_length = min([T5_MAX_LENGTH, *(t.model_max_length for t in comps.tokenizers[:1])])
        comps.extras.update({
            "t5_max_length": cfg.t5xxl_max_token_length or default_length,
            "model_prediction_type": cfg.model_prediction_type,
            "cpu_offload_checkpointing": bool(cfg.cpu_offload_checkpointing),
            "train_t5xxl": trains_t5(spec),
            "key_mask": install_key_mask(comps.denoiser),
        })
        self._check_block_swap(cfg, comps)
        return comps

    def load_model(self, source: ModelSource) -> Components:
        from lorakit.families.chroma.loading import (
            load_chroma_components,
            load_transformer_alone,
        )
        from lorakit.families.chroma.model_files import load_chroma_parts

        files, dtype = source.files, source.dtype or torch.float32
        if source.denoiser_only:
            return Components(load_transformer_alone(source.path, dtype).eval(), None, [None], [], {"source": source.path})
        if source.partial and not Path(source.path).is_dir():
            comps = load_chroma_parts(source.path, t5xxl=files.get("t5xxl"), dtype=dtype)
        else:
            comps = load_chroma_components(source.path, t5xxl=files.get("t5xxl"), ae=files.get("ae"), dtype=dtype,
                                           text_encoders=source.text_encoders)
        if source.fp8:
            layers = to_fp8(comps.denoiser)
            if source.fp8 == "all":
                layers += sum(to_fp8(encoder) for encoder in comps.text_encoders if encoder is not None)
            log.info("--fp8_base: %d linear layers store float8_e4m3fn weights", layers)
        return comps

    @staticmethod
    def _check_block_swap(cfg: Any, comps: Components) -> None:
        """sd-scripts' limits on --blocks_to_swap (as FLUX.1: N//2 double and 2·(N − N//2) single blocks)."""
        swap = cfg.blocks_to_swap or 0
        if not swap:
            return
        plan_double_single_swap(comps, swap, "Chroma allows 35")

    # ----------------------------------------------------------------------------------------- training

    def objective(self, cfg: Any, comps: Components) -> FlowObjective:
        return FlowObjective.from_options(cfg, patch_size=PATCH)

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """T5's hidden states and padding mask (T5 runs with the mask, as Chroma was trained)."""
        if self.text_cache is None:
            return TextConditioning(self.text_encoder_outputs(comps, captions))
        return TextConditioning(self.text_cache.outputs(captions, lambda texts: self.text_encoder_outputs(comps, texts)))

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """sd-scripts' `t5_out`, `t5_attn_mask` and `txt_ids` (zeros) of its Chroma runs (no CLIP-L)."""
        t5, tokenizer = comps.text_encoders[0], comps.tokenizers[0]
        tokens = tokenizer(captions, padding="max_length", max_length=comps.extras["t5_max_length"], truncation=True,
                           return_tensors="pt")
        mask = to_device(tokens.attention_mask, t5.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and comps.extras.get("train_t5xxl", False)):
            hidden = t5(to_device(tokens.input_ids, t5.device), attention_mask=mask).last_hidden_state
        return {"t5_out": hidden, "t5_attn_mask": mask, "txt_ids": hidden.new_zeros(*hidden.shape[:2], 3)}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: Any) -> torch.Tensor:
        """The transformer's velocity for the noisy latents, turned per --model_prediction_type."""
        self.prepare_block_swap(comps, None, noisy.device)  # once, with --blocks_to_swap
        _, _, height, width = noisy.shape
        dtype = noisy.dtype
        t5, keep = trim_text(text.tensors["t5_out"], text.tensors["t5_attn_mask"].to(noisy.device))
        comps.extras["key_mask"].set(keep, height, width)
        sigmas = timesteps_to_sigmas(timesteps)
        output = comps.denoiser(
            hidden_states=pack_latents(noisy),
            encoder_hidden_states=t5.to(dtype),
            timestep=sigmas.to(dtype),  # diffusers' Chroma multiplies by 1000 inside
            img_ids=image_position_ids(height, width, noisy.device, dtype),
            txt_ids=torch.zeros(t5.shape[1], 3, device=noisy.device, dtype=dtype),
            return_dict=False,
        )[0]
        velocity = unpack_latents(output, height, width)
        return apply_model_prediction_type(velocity, noisy, sigmas, comps.extras["model_prediction_type"])

    # ----------------------------------------------------------------------------------------- adapters

    def adapter_targets(self, comps: Components, spec: TargetSpec) -> list[AdapterTarget]:
        args: BflNetworkArgs = spec.family_args
        alpha = spec.alpha_option or None
        targets: list[AdapterTarget] = []
        if spec.train_unet:
            config = comps.denoiser.config
            rows = bfl_keys.lora_rows(config.num_layers, config.num_single_layers)
            targets += block_targets(comps.denoiser, rows, args, alpha)
            targets += embedder_targets(comps.denoiser, bfl_keys.EMBEDDER_GROUPS, bfl_keys.TOP_LEVEL, args, alpha)
        if spec.train_text_encoder and args.train_t5xxl:
            ranks = RankChoice(args.network_dim, alpha or float(args.network_dim))
            targets += reg_ranked(t5_targets(comps.text_encoders[0], "lora_te3", ranks), args, alpha)
        return targets

    def lycoris_denoiser_targets(self, comps: Components, spec: TargetSpec, preset_classes: set[str]) -> list[AdapterTarget]:
        """The layers LyCORIS' walk over the original model would pick for the preset, among the family's targets:
        DoubleStreamBlock/SingleStreamBlock presets take every block linear, SelfAttention the attention ones."""
        targets = [t for t in self.adapter_targets(comps, spec) if t.component == "unet"]
        if preset_classes & BFL_BLOCK_CLASSES:
            return targets
        if BFL_ATTENTION_CLASS in preset_classes:
            return [t for t in targets if _ATTENTION.search(t.name)]
        return []

    def text_encoders_to_train(self, comps: Components, spec: TargetSpec) -> list[torch.nn.Module]:
        return [comps.text_encoders[0]] if trains_t5(spec) else []

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        if comps.extras.get("cpu_offload_checkpointing"):
            comps.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_offloading_to_cpu)
        else:
            comps.denoiser.enable_gradient_checkpointing()
        if train_text_encoder and comps.extras.get("train_t5xxl"):
            comps.text_encoders[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Chroma is always sampled with T5's padding hidden (diffusers' ChromaPipeline masks it, as `masking.py` says), so
    # flux_minimal_inference.py's --apply_t5_attn_mask, which sd-scripts requires for Chroma, asks for what it does
    text_mask_options = ("apply_t5_attn_mask",)

    def masked_prompt_inputs(self, comps: Components, prompt: str, negative: str, masks: frozenset[str]) -> dict[str, Any]:
        return {}  # the pipeline's own encoding is the masked one

    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers ChromaPipeline over these very modules; it samples with its flow Euler scheduler whatever
        `sampler` says, as sd-scripts does."""
        from diffusers import ChromaPipeline

        from lorakit.families.chroma.loading import flow_scheduler

        return ChromaPipeline(scheduler=flow_scheduler(), vae=comps.vae, text_encoder=comps.text_encoders[0],
                              tokenizer=comps.tokenizers[0], transformer=comps.denoiser)

    def lora_to_diffusers(self, state, metadata, *, keep_alpha: bool = False):
        return CONVERTER.kohya_to_diffusers(state, metadata, keep_alpha=keep_alpha)

    def lora_from_diffusers(self, state, metadata):
        return CONVERTER.diffusers_to_kohya(state, metadata)

    def loader_support(self, style: str, algorithm: str, keys: list[str], **flags: Any) -> dict[str, str]:
        """As every family, except that ComfyUI names Chroma's T5 `lora_te1` (its only text encoder)."""
        support = super().loader_support(style, algorithm, keys, **flags)
        if style == "kohya" and any(k.startswith("lora_te3_") for k in keys):
            support["ComfyUI"] = "yes, but its T5 (lora_te3) modules are not loaded (ComfyUI names Chroma's T5 lora_te1)"
        return support

    # ----------------------------------------------------------------------------------------- metadata

    def metadata(self, cfg: Any) -> dict[str, str]:
        """sd-scripts' `ss_*` keys of flux_train_network.py --model_type chroma."""
        return {
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_v2": "False",
            "ss_model_type": "chroma",
            "ss_apply_t5_attn_mask": "True",
            **flow_sampling_metadata(cfg),
            "ss_guidance_scale": "0.0",
            "ss_model_prediction_type": str(cfg.model_prediction_type),
        }

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """sd-scripts' ModelSpec for Chroma: architecture `chroma`, no prediction type (as for FLUX.1)."""
        return BaseModelFacts(BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE, MODELSPEC_IMPLEMENTATION, 1024, None)

    # ----------------------------------------------------------------------------------------- whole-model files

    def save_single_file(self, comps: Components, path: Path, kind: str) -> None:
        """The transformer alone, in the original layout (`kind` "diffusers": under diffusers' names); T5 goes to a
        file of its own (`save_part_file`)."""
        from lorakit.families.chroma.model_files import save_transformer_file

        save_transformer_file(comps.denoiser, path, layout="diffusers" if kind == "diffusers" else "bfl")

    def save_folder(self, comps: Components, path: Path) -> None:
        from lorakit.checkpoint_io import save_pipeline_atomic

        if comps.vae is None or any(part is None for part in comps.text_encoders) or not comps.tokenizers:
            raise ConfigError([f"--save_to {path}: a diffusers folder needs the whole pipeline; this Chroma model was read "
                               "from single files, so save it as .safetensors"])
        save_pipeline_atomic(self.pipeline(comps), path)

    def save_part_file(self, comps: Components, part: str, path: Path, dtype: torch.dtype | None) -> None:
        from lorakit.families.common.bfl_parts import save_t5_file

        save_t5_file(comps.text_encoders[self.separate_parts[part].encoder_index], path, dtype)


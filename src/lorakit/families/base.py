"""The contract between a model family and the rest of lorakit.

Everything training, data, sampling, adapters and the tools need to know about an architecture is asked of a
`ModelFamily`: how to load it, encode images and text, predict, which layers adapters attach to and how LoRA files
name them, the latent-file format, the bucket step, the block layout, sample defaults, metadata and ModelSpec
names, the family's own option checks, detection from a checkpoint and from a LoRA file, and whole-model files
for the tools. Nothing outside `families/` names a family; adding one is a folder implementing this class plus
one line in `registry.py` (docs/architecture.md has the checklist).

Members with a body here are optional (the default says what a family without the feature does); the others
raise `NotImplementedError` until a family defines them, and the conformance test checks every registered
family defines them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.adapters.blocks import BlockLayout
    from lorakit.adapters.key_layout import KeyLayout
    from lorakit.adapters.spec import TargetSpec
    from lorakit.adapters.targets import AdapterTarget
    from lorakit.data.latent_files import LatentFileFormat
    from lorakit.data.text_cache import CaptionCache
    from lorakit.data.text_files import TextFileFormat


@dataclass
class Components:
    """The loaded pieces of a base model.

    `denoiser` is the network that predicts noise/velocity (U-Net or transformer); `text_encoders` and
    `tokenizers` are parallel lists; `extras` holds anything family-specific (e.g. a noise schedule).
    """

    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    extras: dict[str, Any] = field(default_factory=dict)


def part_names(comps: "Components") -> list[str]:
    """Names of a model's parts: `denoiser`, `vae`, `text_encoder_0`, `text_encoder_1`, ..."""
    return ["denoiser", "vae", *(f"text_encoder_{i}" for i in range(len(comps.text_encoders)))]


def part_modules(comps: "Components") -> dict[str, nn.Module | None]:
    """The model's parts by name (`part_names`); a part the model was loaded without is None."""
    return dict(zip(part_names(comps), [comps.denoiser, comps.vae, *comps.text_encoders]))


@dataclass
class TextConditioning:
    """Text-encoder outputs for a batch; the family decides what is inside."""

    tensors: dict[str, torch.Tensor]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "TextConditioning":
        return TextConditioning(
            {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in self.tensors.items()}
        )


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from and how to build it, without any training option.

    `files` are the parts given in files of their own, by option name (`vae`, and e.g. `clip_l`, `t5xxl`, `ae`
    for the families that take them). With `partial` the tools accept a model some parts of which are missing
    (None in the `Components`): merging into or extracting from weights needs no VAE and no tokenizers. `fp8`
    is None, `"denoiser"` or `"all"`: which frozen linears store float8 weights.
    """

    path: str
    files: Mapping[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    v2: bool = False
    v_parameterization: bool = False
    variant: str | None = None
    fp8: str | None = None
    partial: bool = False
    denoiser_only: bool = False  # only the denoiser is needed (converting it alone): nothing else is loaded
    text_encoders: bool = True  # False: the text encoders and their tokenizers are not built (empty lists)
    tokenizer_cache_dir: str | None = None  # --tokenizer_cache_dir: where a fetched tokenizer is kept and looked for


@dataclass(frozen=True)
class BaseModelFacts:
    """What a file's metadata says about its base model: `ss_base_model_version` and the ModelSpec fields.

    The same facts are written by training and by the tools, so a LoRA file says the same whichever made it.
    `prediction_type` None leaves `modelspec.prediction_type` out (sd-scripts omits it for FLUX).
    """

    version: str
    architecture: str
    implementation: str
    resolution: int
    prediction_type: str | None
    v2: bool = False  # ss_v2: an SD 2.x model


@dataclass(frozen=True)
class LoraHint:
    """Fragments of LoRA module names (or file paths in the diffusers layout) that tell a family's files apart.

    Hints of all families are tried in `priority` order (lower first), because some fragments are shared:
    FLUX diffusers files also hold `transformer.transformer_blocks.`, which alone means SD3.
    """

    priority: int
    fragments: tuple[str, ...]


@dataclass(frozen=True)
class SeparatePart:
    """A model part the tools read from and write back to a file of its own (FLUX's CLIP-L and T5)."""

    encoder_index: int  # its position in `Components.text_encoders`
    lora_prefix: str  # the kohya prefix of its LoRA modules (`lora_te1`)
    what: str  # for messages ("CLIP-L")


@dataclass(frozen=True)
class InferenceDefaults:
    """`lorakit sample`'s values for what the command line leaves out."""

    steps: int = 30
    guidance_scale: float = 7.5
    resolution: int = 512


class FamilyControlNet(Protocol):
    """How a ControlNet (or a ControlNet-LLLite) attaches to a family's denoiser (`families/<name>/controlnet.py`).

    `build` attaches it so that the family's `predict` adds what it computes from `batch.conditioning_images`;
    its files are the layouts the family's ControlNet readers load."""

    title: str  # for messages: "ControlNet", "ControlNet-LLLite"
    modelspec_kind: str  # the ModelSpec architecture suffix of its files

    def option_problems(self, cfg: Any) -> list[str]:
        """Its own option checks, before anything loads."""

    def build(self, cfg: Any, comps: Components, device: torch.device) -> nn.Module:
        """A new ControlNet (from the denoiser, or from --controlnet_model_name_or_path) attached to `comps`."""

    def save(self, module: nn.Module, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None,
             model_format: str) -> None:
        """Its single file (atomically)."""

    def save_folder(self, module: nn.Module, folder: Path) -> bool:
        """Its diffusers folder, where diffusers reads one (False: this kind has no diffusers layout)."""

    def pipeline(self, comps: Components, module: nn.Module | list[nn.Module], sampler: str | None,
                 task: str = "text") -> Any:
        """A pipeline over the model and this ControlNet (or several, each with its own control image) for `task`
        ("text", or one of the family's `image_tasks`); it takes the inputs `sample_inputs` and
        `generation_inputs` name."""

    def sample_inputs(self, image: Any) -> dict[str, Any]:
        """The pipeline inputs for a control image (a PIL image) of training's sample prompts."""

    # -- `lorakit generate` (gen_img.py's --control_net_models / --control_net_lllite_models) --------------
    generate_option: str  # the option naming its files: "control_net_models" or "control_net_lllite_models"

    def file_problems(self, path: str) -> list[str]:
        """What is wrong with a file or folder given to `lorakit generate`, read from its header or config
        (nothing loaded); empty when it is one this family's ControlNet reads."""

    def load(self, path: str, comps: Components, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """A file or folder as `save` / `save_folder` write it, ready to sample with (attached to the denoiser
        where it works inside it)."""

    def generation_inputs(self, task: str, images: list[list[Any]], multipliers: list[float], kept_steps: list[int],
                          denoising_steps: int) -> dict[str, Any]:
        """The pipeline inputs for several ControlNets: per ControlNet, one PIL control image per image of the
        batch, its multiplier and how many of the first `denoising_steps` it guides (gen_img.py's ratio)."""


class ModelFamily:
    """What a model family provides. Subclasses set the class attributes and implement the methods."""

    # -- identity and facts (data) ---------------------------------------------------------------------------
    name: ClassVar[str] = ""  # the registry key and the value of --family
    title: ClassVar[str] = ""  # for messages: "SD 1.x/2.x", "SDXL", ...
    default_network_module: ClassVar[str] = "networks.lora"  # what sd-scripts trains its LoRAs with
    lora_network_modules: ClassVar[tuple[str, ...]] = ()  # sd-scripts' own LoRA modules of this family
    oft_network_modules: ClassVar[tuple[str, ...]] = ()  # OFT modules rotating each fused part on its own
    bucket_step: ClassVar[int] = 64  # --bucket_reso_steps must be a multiple of this
    takes_v2: ClassVar[bool] = False  # --v2 (an SD 2.x model) applies
    # positions in `Components.text_encoders` of the encoders large enough for --base_quant to quantize besides the
    # denoiser (T5-XXL, the LLM encoders); the CLIPs stay as they are
    large_text_encoders: ClassVar[tuple[int, ...]] = ()
    # the memory planner's activation rule (training/memory_plan.py): elements saved per latent pixel and per square
    # root of the denoiser's parameter count, at batch 1 without checkpointing
    activation_factor: ClassVar[float] = 16.0
    reads_caption_weights: ClassVar[bool] = False  # --weighted_captions applies (CLIP prompts, clip_prompts.py)
    block_layout: ClassVar["BlockLayout | None"] = None  # block-wise ranks, LR weights, LBW; None: no blocks
    all_layers_args: ClassVar[Mapping[str, str]] = {}  # --network_args listing every layer a LoRA file may name
    oft_attention: ClassVar[re.Pattern[str]] = re.compile(r"(?!)")  # OFT's default layers, by kohya name
    lora_hints: ClassVar[tuple[LoraHint, ...]] = ()
    version_prefixes: ClassVar[tuple[str, ...]] = ()  # ss_base_model_version values of this family start so
    architecture_fragments: ClassVar[tuple[str, ...]] = ()  # modelspec.architecture of this family contains one
    inference: ClassVar[InferenceDefaults] = InferenceDefaults()
    part_files: ClassVar[tuple[str, ...]] = ("vae",)  # options naming model parts in files of their own
    separate_parts: ClassVar[Mapping[str, SeparatePart]] = {}
    single_file_kinds: ClassVar[tuple[str, ...]] = ("safetensors", "ckpt")
    save_formats: ClassVar[tuple[str, ...]] = ("kohya",)  # LoRA layouts training can write (--save_format)
    trains_whole_model: ClassVar[bool] = False  # `lorakit finetune`/`dreambooth` (its checkpoint_pieces)
    block_lr_count: ClassVar[int] = 0  # values --block_lr takes (0: the family has no --block_lr)
    freezes_last_blocks: ClassVar[bool] = False  # --num_last_block_to_freeze applies (parameters_to_freeze)
    uses_own_scheduler: ClassVar[bool] = False  # samples with its own flow scheduler whatever the sampler name
    image_tasks: ClassVar[tuple[str, ...]] = ()  # pipelines besides text-to-image: "img2img", "inpaint"
    # whole-model files (`lorakit model convert/merge`)
    single_file_denoiser_only: ClassVar[bool] = False  # its single file holds the denoiser alone (parts elsewhere)
    single_file_without_encoders: ClassVar[bool] = False  # a single file may leave the text encoders out
    save_precisions: ClassVar[tuple[str, ...]] = ("float", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16")  # --save_precision of whole models
    single_file_denoiser_prefixes: ClassVar[tuple[str, ...]] = ()  # key prefixes of the denoiser in its single file
    #: textual inversion: the embedding file's key for each text encoder, in `Components.text_encoders` order
    #: (sd-scripts' names); empty: the family has no textual inversion
    textual_inversion_keys: ClassVar[tuple[str, ...]] = ()
    # which loaders read this family's LoRA files (`lorakit lora inspect`; peers.md §4 has the loaders' key tables)
    webui_kohya: ClassVar[str] = "yes"  # A1111/Forge on the kohya layout
    webui_diffusers: ClassVar[str] = "no"  # A1111/Forge on the diffusers/PEFT layout
    comfy_diffusers: ClassVar[str] = "yes"  # ComfyUI on the diffusers/PEFT layout
    # diffusers/PEFT-layout module paths (regular expressions) a loader's key map lacks -> what they are
    comfy_drops: ClassVar[Mapping[str, str]] = {}
    diffusers_skips: ClassVar[Mapping[str, str]] = {}
    diffusers_kohya: ClassVar[str] = "yes (converted on load)"  # diffusers on a plain kohya LoRA
    diffusers_ignores: ClassVar[Mapping[str, str]] = {}  # kohya prefix diffusers drops -> what the modules are

    @property
    def latent_format(self) -> "LatentFileFormat":
        """The family's latent cache files (sd-scripts' suffix and stored value convention)."""
        raise NotImplementedError

    @property
    def text_cache_format(self) -> "TextFileFormat":
        """The family's text-encoder cache files (sd-scripts' suffix and keys, the options the outputs depend on)."""
        raise NotImplementedError

    @property
    def lora_layout(self) -> "KeyLayout":
        """How this family's LoRA files name modules, in the kohya and the diffusers/PEFT layouts."""
        raise NotImplementedError

    # -- detection (cheap: no model loads) -------------------------------------------------------------------
    def owns_checkpoint(self, path: str) -> bool:
        """Whether `path` (a file or a diffusers folder) is a model of this family, from its header only."""
        raise NotImplementedError

    # -- options (checked before anything large loads) -------------------------------------------------------
    def option_problems(self, cfg: Any, spec: "TargetSpec | None" = None) -> list[str]:
        """The family's own checks of the training options (and of the adapter spec, when a run trains one);
        every problem, as messages. Runs before any model loads."""
        problems = []
        if cfg.bucket_reso_steps % self.bucket_step:
            problems.append(f"--bucket_reso_steps must be a multiple of {self.bucket_step} for --family {self.name} "
                            f"(got {cfg.bucket_reso_steps})")
        if cfg.v2 and not self.takes_v2:
            problems.append(f"--v2 selects an SD 2.x model and cannot be used with --family {self.name}")
        if getattr(cfg, "weighted_captions", False) and not self.reads_caption_weights:
            problems.append(f"--weighted_captions is not available for --family {self.name}: its prompts carry no "
                            "attention weights (sd-scripts refuses it too); remove it and write captions without weights")
        if cfg.save_format not in self.save_formats:
            problems.append(f"--save_format {cfg.save_format}: the {self.name} family writes the kohya layout only "
                            "(convert afterwards with `lorakit lora convert --to diffusers`)")
        return problems

    def option_warnings(self, cfg: Any) -> list[str]:
        """Options the family ignores or reads differently, said once at start-up."""
        return []

    def conditioning_use(self, cfg: Any) -> Any:
        """What a run of this model does with `conditioning_data_dir` subsets (`data.conditioning.ConditioningUse`):
        loss masks only, as sd-scripts, unless the model itself reads one reference image per training image (an
        image-editing model trains on such pairs). Decided from the options alone, before anything loads."""
        from lorakit.data.conditioning import ConditioningUse

        return ConditioningUse.MASK

    def network_module(self, given: str | None) -> str:
        """The network module `given` (--network_module, None when left out) names for this family.

        sd-scripts' per-family scripts (`sd3_train_network.py`, `flux_train_network.py`) are run with
        `--network_module=networks.lora` in its own guides: the family's LoRA module is what that means, and
        what the file records."""
        return self.default_network_module if given in (None, "networks.lora") else given

    def parse_network_args(self, args: Mapping[str, str], spec: "TargetSpec") -> tuple[Any, list[str]]:
        """The family's own `--network_args` (e.g. FLUX's per-type ranks) as a typed value, and the problems.

        `args` are the keys the adapter algorithm leaves to the family. The default reads none of them and
        refuses the keys only other families' LoRA modules read (the option checks refuse keys nobody reads)."""
        from lorakit.config.support import generic_lora_keys
        from lorakit.families.registry import all_families

        readers = {key: [family.title for family in all_families() if key in (family.family_arg_keys(spec.module) or ())]
                   for key in args if key not in generic_lora_keys()}
        return None, [f"--network_args {key}: an option of the {' and '.join(names)} LoRA modules only; {self.title} "
                      "models have no such layers (remove it)" for key, names in readers.items() if names]

    def family_arg_keys(self, module: str) -> frozenset[str] | None:
        """The --network_args keys this family reads for `module` (None: the family checks no keys itself)."""
        return None

    # -- training ---------------------------------------------------------------------------------------------
    def load(self, cfg: Any, spec: "TargetSpec | None" = None, text_cache: "CaptionCache | None" = None) -> Components:
        """The base model for training, with the family's training-time settings read from `cfg` and from what
        the run trains (`spec`: which encoders carry adapters decides what can be cached). `text_cache` is the
        run's cache of text-encoder outputs (`data/text_cache.py`; None: an in-memory one when `cfg` asks for
        caching); when its `needs_encoders` is False the text encoders are not built (`ModelSource.text_encoders`)."""
        raise NotImplementedError

    def load_model(self, source: ModelSource) -> Components:
        """The base model alone (for sampling and the tools)."""
        raise NotImplementedError

    def training_source(self, cfg: Any, text_cache: Any = None, **extra: Any) -> ModelSource:
        """What a training run loads: the model and part files its options name, its load dtype and fp8 choice,
        the text encoders only when some caption is not cached (`text_cache`)."""
        from lorakit.precision import load_dtype

        return ModelSource(
            cfg.pretrained_model_name_or_path, {k: getattr(cfg, k) for k in self.part_files if getattr(cfg, k)},
            load_dtype(cfg), fp8="denoiser" if cfg.fp8_base_unet else ("all" if cfg.fp8_base else None),
            text_encoders=text_cache is None or text_cache.needs_encoders, **extra)

    def objective(self, cfg: Any, comps: Components) -> Any:
        """The noising rule and target (`lorakit.objectives`): `.noise(latents) -> NoisedBatch`."""
        raise NotImplementedError

    def encode_images(self, comps: Components, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B,3,H,W) -> scaled latents, ready for noising."""
        raise NotImplementedError

    def decode_latents(self, comps: Components, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, comps: Components, captions: list[str], clip_skip: int | None = None) -> TextConditioning:
        """The denoiser's text conditioning for the captions (from the text cache where the run keeps one)."""
        raise NotImplementedError

    def text_encoder_outputs(self, comps: Components, captions: list[str], clip_skip: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """The text encoders' outputs for the captions, batched, under the keys of `text_cache_format`'s files:
        what text-encoder caching stores and `encode_text` assembles into the conditioning."""
        raise NotImplementedError

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                batch: Any) -> torch.Tensor:
        """The denoiser's output for the noisy latents."""
        raise NotImplementedError

    def adapter_targets(self, comps: Components, spec: "TargetSpec") -> list["AdapterTarget"]:
        """The layers an adapter network attaches to, named as this family's kohya files name them."""
        raise NotImplementedError

    def text_encoders_to_train(self, comps: Components, spec: "TargetSpec") -> list[nn.Module]:
        """The encoders whose layers carry adapters (they run with gradients)."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self, comps: Components, train_text_encoder: bool) -> None:
        raise NotImplementedError

    def swaps_blocks(self, cfg: Any) -> bool:
        """Whether `--blocks_to_swap` applies: the denoiser is then placed by `prepare_block_swap`."""
        return False

    def prepare_block_swap(self, comps: Components, cfg: Any, device: torch.device) -> None:
        """--blocks_to_swap: keep the swapped blocks on the CPU and stream them in (families without it: nothing)."""

    def denoiser_blocks(self, comps: Components) -> list[list[nn.Module]]:
        """The denoiser's blocks, list by list (what `--compile` compiles one by one). The default takes every
        `nn.ModuleList` child of the denoiser named `*blocks` or `*layers` (diffusers' transformer and U-Net lists)
        and a middle block."""
        lists: list[list[nn.Module]] = []
        for name, child in comps.denoiser.named_children():
            if isinstance(child, nn.ModuleList) and name.endswith(("blocks", "layers")):
                lists.append(list(child))
            elif name in ("mid_block", "middle_block") and child is not None:
                lists.append([child])
        return lists

    def memory_facts(self, cfg: Any) -> Any:
        """What the memory planner reads about the run's model (`families/common/memory_facts.MemoryFacts`): its
        parts' parameter counts and the denoiser's blocks, from the files' headers (nothing loaded). The default
        reads `--pretrained_model_name_or_path` (a single file or a diffusers folder) and the `part_files`."""
        from lorakit.families.common.memory_facts import header_facts

        parts = {option: getattr(cfg, option) for option in self.part_files if getattr(cfg, option, None)}
        return header_facts(cfg.pretrained_model_name_or_path, parts)

    def text_encoder_lr_groups(self, cfg: Any) -> dict[str, float | None] | None:
        """kohya prefix -> LR from --text_encoder_lr's values, for several encoders (None: one LR for all)."""
        return None

    def kohya_module_path(self, comps: Components) -> Callable[[str], str] | None:
        """How denoiser module paths are renamed in file names, for adapters that walk the model (LyCORIS)."""
        return None

    def lycoris_denoiser_targets(self, comps: Components, spec: "TargetSpec", preset_classes: set[str]
                                 ) -> list["AdapterTarget"] | None:
        """The denoiser layers a LyCORIS preset adapts, when they must come from the family's own targets
        (fused views the diffusers model keeps apart); None lets LyCORIS walk the denoiser itself."""
        return None

    def lora_file_state(self, state: dict[str, torch.Tensor], metadata: dict[str, str], save_format: str
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of a LoRA file in `save_format` (one of `save_formats`)."""
        return state, metadata

    def controlnet(self, cfg: Any) -> FamilyControlNet | None:
        """The ControlNet `lorakit controlnet` trains on this family (None: the family has none); `lorakit
        generate` asks with `cfg` None."""
        return None

    # -- sampling ---------------------------------------------------------------------------------------------
    def pipeline(self, comps: Components, sampler: str | None = None) -> Any:
        """A diffusers pipeline over these very modules (an attached LoRA shows in its images), sampling with
        `sampler` (an sd-scripts sampler name; the family's default when None). Families that sample with their
        own flow scheduler whatever the name set `uses_own_scheduler`."""
        raise NotImplementedError

    def task_pipeline(self, comps: Components, task: str, sampler: str | None = None) -> Any:
        """The diffusers pipeline for `task` (one of `image_tasks`: "img2img" from an init image, "inpaint" with a
        mask) over these very modules, with the same scheduler as `pipeline`."""
        raise NotImplementedError(f"the {self.title} family has no {task} pipeline")

    def load_embedding(self, comps: Components, state: dict[str, torch.Tensor], token: str, source: str) -> None:
        """Add a textual-inversion embedding's vectors (`state`, read from `source`) to the text encoders and
        tokenizers under `token` (multi-vector embeddings as `token`, `token_1`, ... as diffusers does)."""
        raise NotImplementedError(f"the {self.title} family takes no textual-inversion embeddings")

    def prompt_embedding_kwargs(self, pipe: Any, prompts: list[str], negatives: list[str], *,
                                max_embeddings_multiples: int, clip_skip: int | None) -> dict[str, Any] | None:
        """The pipeline's prompt-embedding arguments for weighted and long prompts (sd-scripts' `(word:1.2)`
        syntax, `--max_embeddings_multiples` chunks of 75 tokens), or None where the family encodes the plain text
        itself (the weighting syntax is then removed from the prompt)."""
        return None

    #: sd-scripts' minimal-inference options hiding text padding (`apply_t5_attn_mask`, ...) this family's sampling honours
    text_mask_options: tuple[str, ...] = ()

    def masked_prompt_inputs(self, comps: Components, prompt: str, negative: str, masks: frozenset[str]) -> dict[str, Any]:
        """The pipeline's prompt inputs for one image, encoded with the padding hidden as the `masks` options
        (among `text_mask_options`) say; empty where the family has none."""
        return {}

    def inference_resolution(self, source: ModelSource) -> int:
        """`lorakit sample`'s default image side for this model."""
        return self.inference.resolution

    # -- metadata ---------------------------------------------------------------------------------------------
    def metadata(self, cfg: Any) -> dict[str, str]:
        """Family-specific `ss_*` metadata keys (`ss_base_model_version` among them)."""
        raise NotImplementedError

    def base_model(self, version: str | None, *, variant: str | None = None, v_prediction: bool = False) -> BaseModelFacts:
        """The ModelSpec facts of a base-model version (None: the family's default version); `variant` is a
        loaded model's own name where one version covers several (FLUX.1 dev/schnell)."""
        raise NotImplementedError

    def trained_base_model(self, cfg: Any, comps: Components | None) -> BaseModelFacts:
        """The facts of the model a run trains on (read from its options and, once loaded, the model)."""
        variant = self.model_variant(comps) if comps is not None else None
        return self.base_model(self.metadata(cfg)["ss_base_model_version"], variant=variant,
                               v_prediction=bool(getattr(cfg, "v_parameterization", False)))

    def model_variant(self, comps: Components) -> str | None:
        """A loaded model's variant within its version (None where versions say everything)."""
        return None

    def variant_of_architecture(self, architecture: str) -> str | None:
        """The variant a file's `modelspec.architecture` names, where one version covers several."""
        return None

    def version_of(self, source: ModelSource, comps: Components) -> str:
        """`ss_base_model_version` of a model the tools loaded."""
        return self.base_model(None).version

    # -- whole-model files for the tools ----------------------------------------------------------------------
    def save_single_file(self, comps: Components, path: Path, kind: str, dtype: torch.dtype | None = None) -> None:
        """The model as one original-layout file (`kind` is one of `single_file_kinds`), its floating tensors
        cast to `dtype` as they are written (None: as loaded); streamed, so saving adds little to the model."""
        raise NotImplementedError

    def save_folder(self, comps: Components, path: Path) -> None:
        """The model as a diffusers folder."""
        raise NotImplementedError

    def save_part_file(self, comps: Components, part: str, path: Path, dtype: torch.dtype | None) -> None:
        """A part read from a file of its own (`separate_parts`) written back in its layout."""
        raise NotImplementedError(f"the {self.title} family keeps no parts in files of their own")

    # -- whole-model training (full fine-tune, DreamBooth) ----------------------------------------------------
    def checkpoint_parts(self, comps: Components) -> tuple[str, ...]:
        """The parts (`part_names`) the family's original single file holds, of those this model has."""
        return tuple(name for name, module in part_modules(comps).items() if module is not None)

    def checkpoint_pieces(self, comps: Components, parts: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        """The named parts' tensors under the names the original single file gives them, in file order and in
        pieces (a block at a time where a conversion builds new tensors), so a writer holds one piece at a time.
        Defined by the families that `trains_whole_model`."""
        raise ConfigError([f"whole-model training is not available for the {self.title} family yet (LoRA training is)"])

    def lr_blocks(self, comps: Components) -> Callable[[str], int] | None:
        """The `--block_lr` block (0 .. block_lr_count-1) of a denoiser parameter name (None: no --block_lr)."""
        return None

    def parameters_to_freeze(self, comps: Components, last_blocks: int) -> list[str]:
        """Denoiser parameter names sd-scripts' `--num_last_block_to_freeze N` freezes (empty: the family has
        no such option; the option check says so)."""
        return []

    # -- LoRA files -------------------------------------------------------------------------------------------
    def lora_to_diffusers(self, state: dict[str, torch.Tensor], metadata: dict[str, str], *, keep_alpha: bool = False
                          ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """A kohya state dict in the diffusers/PEFT layout, where the family converts whole states itself
        (fused modules split into parts); None: module by module through `lora_layout`."""
        return None

    def lora_from_diffusers(self, state: dict[str, torch.Tensor], metadata: dict[str, str]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The kohya state of a diffusers/PEFT file, where the family converts whole states (None: per module)."""
        return None

    def loader_support(self, style: str, algorithm: str, keys: list[str], *, dora_on_output: bool = False
                       ) -> dict[str, str]:
        """Which loaders (sd-scripts, ComfyUI, A1111/Forge, diffusers) read a file of this family in `style`, from
        its keys: a loader that maps only some of its modules gets a "partly" naming what it drops."""
        plain = algorithm.startswith(("lora", "locon"))
        has_alpha = any(k.endswith(".alpha") for k in keys)
        if style == "kohya":
            ignored = [what for prefix, what in self.diffusers_ignores.items() if any(k.startswith(prefix) for k in keys)]
            reads = self.diffusers_kohya if plain else "no"
            if ignored and reads.startswith("yes"):
                reads += f", but its {' and '.join(ignored)} modules are ignored"
            verdicts = {"sd-scripts": "yes" if plain or algorithm == "oft" else "no (LyCORIS module needed)",
                        "ComfyUI": "yes", "A1111/Forge": self.webui_kohya, "diffusers": reads}
        else:
            modules = sorted({peft_module_path(k) for k in keys})
            reads = "yes" if plain and not has_alpha else ("yes, but .alpha keys are ignored" if plain else "no")
            verdicts = {
                "sd-scripts": "no (convert to kohya: lorakit lora convert --to kohya)",
                "ComfyUI": partial_verdict(self.comfy_diffusers, modules, self.comfy_drops, "dropped ('lora key not loaded')"),
                "A1111/Forge": self.webui_diffusers,
                "diffusers": partial_verdict(reads, modules, self.diffusers_skips, "ignored"),
            }
        if dora_on_output:  # they divide the magnitude by the norm of W, training by that of W + ΔW
            for loader in ("ComfyUI", "A1111/Forge"):
                if verdicts[loader].startswith(("yes", "partly", "Forge", "A1111")):
                    verdicts[loader] = ("loads, but applies the output-axis DoRA magnitude (wd_on_output=True) "
                                        "differently from training: its images differ")
        return verdicts


def peft_module_path(key: str) -> str:
    """The module path of a diffusers/PEFT LoRA key (its tensor suffix cut)."""
    key = key.removeprefix("base_model.model.")
    for marker in (".lora_A", ".lora_B", ".lora_magnitude_vector", ".alpha"):
        if marker in key:
            return key[: key.index(marker)]
    return key.rsplit(".", 1)[0]


def partial_verdict(verdict: str, modules: list[str], unmapped: Mapping[str, str], fate: str) -> str:
    """`verdict`, or "partly" when some modules match a pattern of `unmapped` (a loader's key map lacks them),
    "no" when all do."""
    if not verdict.startswith("yes"):
        return verdict
    lost = {what: sum(1 for m in modules if re.search(pattern, m)) for pattern, what in unmapped.items()}
    lost = {what: n for what, n in lost.items() if n}
    if not lost:
        return verdict
    described = " and ".join(f"its {what} ({n} of {len(modules)} modules)" for what, n in lost.items())
    if sum(lost.values()) >= len(modules):
        return f"no: {described} are {fate}"
    return f"partly: {described} are {fate}"

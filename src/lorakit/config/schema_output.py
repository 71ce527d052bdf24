"""Option sections for saving/resume, sampling, metadata and lorakit's own options (inventory §2.10–2.12)."""

from __future__ import annotations

from typing import Literal, ClassVar

from pydantic import Field, field_validator

from lorakit.config.schema_data import OptionSection
from lorakit.config.types import SampleSampler, SaveModelAs, SavePrecision


class SavingOptions(OptionSection):
    SECTION: ClassVar[str] = "saving"

    output_dir: str | None = Field(None, description="folder for the trained files")
    output_name: str | None = Field(None, description="base name of the trained files")
    save_precision: SavePrecision | None = Field(None, description="float, fp16 or bf16")
    save_model_as: SaveModelAs = Field("safetensors", description="safetensors, ckpt or pt")
    save_format: Literal["kohya", "diffusers"] = Field(
        "kohya", description="LoRA key layout: kohya (every loader of SD/SDXL/FLUX) or diffusers (what diffusers and A1111 read for SD3)"
    )
    save_every_n_epochs: int | None = Field(None, ge=1, description="save every N epochs")
    save_every_n_steps: int | None = Field(None, ge=1, description="save every N steps")
    save_n_epoch_ratio: int | None = Field(None, ge=1, description="save about N times during training")
    save_last_n_epochs: int | None = Field(None, ge=1, description="keep the last N epoch files")
    save_last_n_epochs_state: int | None = Field(None, ge=1, description="keep the last N epoch states")
    save_last_n_steps: int | None = Field(None, ge=1, description="keep files of the last N steps")
    save_last_n_steps_state: int | None = Field(None, ge=1, description="keep states of the last N steps")
    save_state: bool = Field(False, description="save a resumable state with every file")
    save_state_on_train_end: bool = Field(False, description="save a resumable state at the end")
    resume: str | None = Field(None, description="state folder to resume from")
    initial_epoch: int | None = Field(None, ge=1, description="starting epoch (1-based)")
    initial_step: int | None = Field(None, ge=0, description="starting global step")
    skip_until_initial_step: bool = Field(False, description="skip batches up to the initial step")
    huggingface_repo_id: str | None = Field(None, description="upload to this Hugging Face repo")
    huggingface_repo_type: str | None = Field(None, description="Hugging Face repo type")
    huggingface_path_in_repo: str | None = Field(None, description="path inside the repo")
    huggingface_token: str | None = Field(None, description="Hugging Face token")
    huggingface_repo_visibility: str | None = Field(None, description="public, else private")
    save_state_to_huggingface: bool = Field(False, description="upload states too")
    resume_from_huggingface: bool = Field(False, description="download the --resume state first")
    async_upload: bool = Field(False, description="upload in the background")


class SamplingOptions(OptionSection):
    SECTION: ClassVar[str] = "sampling"

    sample_prompts: str | None = Field(None, description="prompt file (.txt, .toml, .json)")
    # sd-scripts disables sampling (with a warning) for values <= 0, so no lower bound here.
    sample_every_n_steps: int | None = Field(None, description="sample every N steps")
    sample_every_n_epochs: int | None = Field(None, description="sample every N epochs (overrides steps)")
    sample_at_first: bool = Field(False, description="sample before training")
    sample_sampler: SampleSampler = Field("ddim", description="[SD/SDXL] sampler")


class MetadataOptions(OptionSection):
    SECTION: ClassVar[str] = "metadata"

    training_comment: str | None = Field(None, description="stored as ss_training_comment")
    no_metadata: bool = Field(False, description="write only the minimal metadata")
    metadata_title: str | None = Field(None, description="modelspec title (default output_name)")
    metadata_author: str | None = Field(None, description="modelspec author")
    metadata_description: str | None = Field(None, description="modelspec description")
    metadata_license: str | None = Field(None, description="modelspec license")
    metadata_tags: str | None = Field(None, description="modelspec tags, comma separated")
    metadata_usage_hint: str | None = Field(None, description="modelspec usage hint")
    metadata_thumbnail: str | None = Field(None, description="thumbnail image file or data URL")
    metadata_merged_from: str | None = Field(None, description="modelspec merged_from")
    metadata_trigger_phrase: str | None = Field(None, description="modelspec trigger phrase")
    metadata_preprocessor: str | None = Field(None, description="modelspec preprocessor")
    metadata_is_negative_embedding: str | None = Field(None, description="modelspec is_negative_embedding")


class LorakitOptions(OptionSection):
    SECTION: ClassVar[str] = "lorakit"

    family: str = Field("auto", description="model family (auto: detected from the checkpoint)")
    dry_run: bool = Field(False, description="check everything and print the plan, then stop")
    config_file: str | None = Field(None, description="TOML file of options (the command line wins)")
    output_config: bool = Field(False, description="write the options to --config_file and stop")
    skip_bad_images: bool = Field(False, description="leave out images that cannot be decoded (listed in a warning) "
                                  "instead of stopping; every image is decoded once at start-up either way")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from lorakit.families.registry import family_names

        if value != "auto" and value not in family_names():
            raise ValueError(f"must be one of {('auto', *family_names())}")
        return value

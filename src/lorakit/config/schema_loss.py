"""Option sections for noise and loss, text-encoder handling and memory offload (inventory §2.7–2.9)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from lorakit.config.schema_data import OptionSection
from lorakit.config.types import BaseQuant, HuberSchedule, LossType, ModelPredictionType, TimestepSampling, WeightingScheme


class NoiseLossOptions(OptionSection):
    SECTION: ClassVar[str] = "noise_and_loss"

    noise_offset: float | None = Field(None, ge=0, description="[SD/SDXL] noise offset")
    noise_offset_random_strength: bool = Field(False, description="random noise offset in [0, offset]")
    adaptive_noise_scale: float | None = Field(None, description="noise offset scaled by latent mean")
    multires_noise_iterations: int | None = Field(None, ge=1, description="pyramid noise iterations")
    multires_noise_discount: float = Field(0.3, ge=0, description="pyramid noise discount")
    ip_noise_gamma: float | None = Field(None, ge=0, description="input perturbation noise")
    ip_noise_gamma_random_strength: bool = Field(False, description="random input perturbation strength")
    zero_terminal_snr: bool = Field(False, description="rescale betas to zero terminal SNR")
    min_timestep: int | None = Field(None, ge=0, le=1000, description="smallest timestep (default 0)")
    max_timestep: int | None = Field(None, ge=0, le=1000, description="largest timestep (default 1000)")
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR weighting gamma")
    scale_v_pred_loss_like_noise_pred: bool = Field(False, description="scale v-pred loss like eps")
    v_pred_like_loss: float | None = Field(None, ge=0, description="add a v-prediction-like loss")
    debiased_estimation_loss: bool = Field(False, description="debiased estimation loss weights")
    loss_type: LossType = Field("l2", description="l1, l2, huber or smooth_l1")
    huber_schedule: HuberSchedule = Field("snr", description="constant, exponential or snr")
    huber_c: float = Field(0.1, gt=0, description="Huber threshold")
    huber_scale: float = Field(1.0, gt=0, description="Huber scale")
    weighting_scheme: WeightingScheme = Field("uniform", description="[DiT] timestep weighting")
    logit_mean: float = Field(0.0, description="[DiT] logit-normal mean")
    logit_std: float = Field(1.0, gt=0, description="[DiT] logit-normal std")
    mode_scale: float = Field(1.29, description="[DiT] mode weighting scale")
    timestep_sampling: TimestepSampling = Field("sigma", description="[flow models] timestep sampling")
    sigmoid_scale: float = Field(1.0, gt=0, description="[flow models] sigmoid sampling scale")
    discrete_flow_shift: float = Field(3.0, gt=0, description="[flow models] flow shift")
    model_prediction_type: ModelPredictionType = Field("sigma_scaled", description="[flow models] prediction transform")


class TextEncoderOptions(OptionSection):
    SECTION: ClassVar[str] = "text_encoder"

    cache_text_encoder_outputs: bool = Field(False, description="cache text-encoder outputs in memory")
    cache_text_encoder_outputs_to_disk: bool = Field(False, description="cache text-encoder outputs to npz files beside the images")
    text_encoder_batch_size: int | None = Field(None, ge=1, description="captions encoded at once when caching to disk "
                                                "(default: --train_batch_size)")


class MemoryOptions(OptionSection):
    SECTION: ClassVar[str] = "memory"

    blocks_to_swap: int | None = Field(None, ge=0, description="[DiT] transformer blocks kept on the CPU")
    cpu_offload_checkpointing: bool = Field(False, description="[DiT] offload checkpointed activations")
    base_quant: BaseQuant | None = Field(None, description="frozen base weights quantized: fp8 (= --fp8_base), fp8_scaled, "
                                         "int8 or nf4 (docs/memory.md)")
    compile: bool = Field(False, description="torch.compile each block of the denoiser (--torch_compile: the whole denoiser)")
    vram_budget: str | None = Field(None, description="device memory to fit the run in (12GB, 8GiB, auto): the planner "
                                    "picks block swap, gradient checkpointing and --base_quant")

    @model_validator(mode="before")
    @classmethod
    def _fp8_is_a_base_quant(cls, data: Any) -> Any:
        # --base_quant fp8 is --fp8_base: the families store float8 as they load, as they always did
        if isinstance(data, dict):
            if data.get("base_quant") == "fp8" and not data.get("fp8_base_unet"):
                data = {**data, "fp8_base": True}
            elif data.get("base_quant") is None and (data.get("fp8_base") or data.get("fp8_base_unet")):
                data = {**data, "base_quant": "fp8"}
        return data

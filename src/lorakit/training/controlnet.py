"""ControlNet training (`lorakit controlnet`): sd-scripts' `train_control_net.py`, `sdxl_train_control_net_lllite.py`
and `flux_train_control_net.py` as one command.

What a ControlNet is for a family (a ControlNet beside the U-Net, a ControlNet-LLLite inside it, a FLUX
ControlNet), how it attaches to the denoiser and which files it writes is the family's `controlnet(cfg)`
(`families/<name>/controlnet.py`); this module makes it a `Trainable`: every parameter of the ControlNet trains at
--learning_rate, the denoiser and the text encoders stay frozen, every subset needs conditioning images, and
sample prompts take their control image from `--cn` / `controlnet_image`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lorakit.data.conditioning import ConditioningUse
from lorakit.families.base import Components, FamilyControlNet, ModelFamily
from lorakit.training.kinds import foreign_option_problems

from lorakit.training.trainable import FrozenModelTraining, TrainableDefaults

log = logging.getLogger("lorakit")


class ControlNetTrainable(TrainableDefaults):
    """A family's ControlNet attached to the loaded model, as the loop trains it."""

    trains_text_encoders = False

    def __init__(self, control: FamilyControlNet, module: nn.Module, final_stem: str):
        self.control, self.module = control, module
        self.final_stem = final_stem  # the run's last file, which also gets the diffusers folder
        self.modelspec_kind = control.modelspec_kind

    def parameter_groups(self, cfg: Any) -> tuple[list[dict[str, Any]], list[str]]:
        return [{"params": self.trainable_parameters(), "lr": cfg.learning_rate}], ["controlnet"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.module.parameters() if param.requires_grad]

    def after_optimizer_step(self, cfg: Any) -> dict[str, float]:
        return {}

    def metadata(self, cfg: Any) -> dict[str, str]:
        return {}

    def save(self, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None, model_format: str) -> None:
        """The family's single file; the last one also as a diffusers folder `<name>_diffusers/` where the
        family's ControlNet has that layout. Like sd-scripts, the file's metadata is the ModelSpec only."""
        spec = {key: value for key, value in metadata.items() if key.startswith("modelspec.")}
        self.control.save(self.module, Path(path), spec, save_dtype, model_format)
        if Path(path).stem == self.final_stem:
            self.control.save_folder(self.module, Path(path).with_name(f"{self.final_stem}_diffusers"))

    def sample_pipeline(self, family: ModelFamily, comps: Components, sampler: str) -> Any:
        return self.control.pipeline(comps, self.module, sampler)

    def sample_inputs(self, prompt: Any) -> tuple[Any, dict[str, Any]]:
        """The prompt's control image (`--cn` / `controlnet_image`), read as RGB."""
        source = prompt.extras.get("controlnet_image")
        if not source:
            log.warning("sample prompt %d has no control image (--cn); it is sampled with a black one",
                        prompt.index + 1)
            return prompt, self.control.sample_inputs(Image.new("RGB", (prompt.width, prompt.height)))
        with Image.open(source) as image:
            return prompt, self.control.sample_inputs(image.convert("RGB"))


class ControlNetTraining(FrozenModelTraining):
    """`lorakit controlnet`: the family's ControlNet, trained on image and conditioning-image pairs."""

    title = "ControlNet"
    conditioning = ConditioningUse.REQUIRED

    def option_problems(self, cfg: Any, family: ModelFamily) -> list[str]:
        problems = foreign_option_problems(cfg, "controlnet")
        control = family.controlnet(cfg)
        if control is None:
            return problems + [f"`lorakit controlnet` has no ControlNet for the {family.title} family"]
        problems += control.option_problems(cfg)
        if cfg.sample_prompts:
            problems += _control_image_problems(cfg.sample_prompts)
        return problems

    def prepare_dataset(self, cfg: Any, dataset: Any) -> None:
        """Nothing: the captions and conditioning images are used as they are."""

    def build(self, cfg: Any, spec: Any, family: ModelFamily, comps: Components, device: torch.device
              ) -> ControlNetTrainable:
        control = family.controlnet(cfg)
        module = control.build(cfg, comps, device)
        module.train()
        count = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log.info("%s: %.2fM trained parameters", control.title, count / 1e6)
        return ControlNetTrainable(control, module, cfg.output_name or "last")


def _control_image_problems(prompt_file: str) -> list[str]:
    """Sample prompts whose control image (`--cn`) does not exist, found before anything loads."""
    from lorakit.errors import ConfigError
    from lorakit.sampling.prompts import read_sample_prompts

    try:
        prompts = read_sample_prompts(prompt_file)
    except ConfigError:
        return []  # reported with the other sampling checks
    return [f"--sample_prompts {prompt_file} (prompt {p.index + 1}): control image {p.extras['controlnet_image']} "
            "does not exist" for p in prompts
            if p.extras.get("controlnet_image") and not Path(p.extras["controlnet_image"]).is_file()]


CONTROLNET = ControlNetTraining()

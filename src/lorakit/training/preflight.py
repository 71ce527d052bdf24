"""Every check a run makes before anything large loads, reported together.

A user who gets one error per attempt pays a model load (minutes for FLUX) for each mistake. So the options'
own problems, the model files, the family's rules, the adapter spec, the dataset (every image decoded once), the
optimizer and LR schedule (built for real over a one-element parameter), the resume state, the sample prompts
and the destination are all checked here, each check going on whatever the others found, and every problem is
raised in one `ConfigError`. Nothing here asks which family or which kind of training it checks.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from lorakit.data.build import build_train_dataset
from lorakit.data.conditioning import ConditioningUse
from lorakit.data.summary import format_summary
from lorakit.errors import ConfigError, DataError
from lorakit.families.base import ModelFamily
from lorakit.families.checks import check_family_options
from lorakit.data.text_cache import CaptionCache, plan_text_cache, text_cache_problems
from lorakit.families.registry import all_families, resolve_family
from lorakit.training import distributed
from lorakit.training.destination import destination_problems
from lorakit.training.hub import download_hub_state, hub_problems
from lorakit.training.memory_plan import plan_memory
from lorakit.training.network_files import base_weight_problems, sized_spec
from lorakit.training.plan import TrainingPlan, format_plan, initial_step_problem, make_plan
from lorakit.training.resume_options import resume_changes

log = logging.getLogger("lorakit")

MODEL_OPTION = "pretrained_model_name_or_path"


@dataclass
class Checked:
    """What the checks built on the way, for the run to use: nothing is built twice."""

    family: Any
    spec: Any
    dataset: Any
    plan: TrainingPlan
    seed: int
    text_cache: CaptionCache | None = None  # the text-encoder cache, its files checked


def check_run(cfg: Any, option_problems: list[str] | tuple[str, ...] = (), kind: Any = None) -> Checked:
    """Check everything about the run `cfg` describes, of the training type `kind` (with the problems the option
    parser found); raise one ConfigError listing every problem, or return what the checks built."""
    problems = list(option_problems)
    missing = model_file_problems(cfg)
    problems += missing
    family, spec = _family_and_spec(cfg, problems, kind, model_found=not _names_missing_model(missing))
    if kind is not None and family is not None:
        problems += kind.option_problems(cfg, family)
    seed = cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1)
    dataset = _dataset(cfg, seed, problems, family, kind)
    # before the text cache is planned: a --vram_budget sets the memory options the run then uses
    memory = plan_memory(cfg, family, dataset, problems) if family is not None and dataset is not None else []
    text_cache = _text_cache(cfg, family, spec, dataset, problems)
    plan = _plan(cfg, family, dataset, text_cache, memory)
    problems += optimizer_problems(cfg, plan.max_train_steps if plan else 1)
    found = hub_problems(cfg)
    if not found:
        download_hub_state(cfg, found)  # before the state folder is checked: that is the download
    problems += found
    problems += before_loading_problems(cfg, plan)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # a given --family's rules ran in the parser too
    return Checked(family, spec, dataset, plan, seed, text_cache)


def model_file_problems(cfg: Any) -> list[str]:
    """The base model and every model part given in a file of its own must exist (the loaders name what is
    missing inside them). Every family's part options are checked: the family may not be known yet."""
    options = dict.fromkeys([MODEL_OPTION, *(part for family in all_families() for part in family.part_files)])
    problems = []
    for option in options:
        value = getattr(cfg, option, None)
        if value and not Path(value).exists():
            what = "model file or diffusers folder" if option == MODEL_OPTION else "file"
            problems.append(f"--{option} {value}: no such {what}")
    return problems


def _names_missing_model(problems: list[str]) -> bool:
    return any(problem.startswith(f"--{MODEL_OPTION} ") for problem in problems)


def _family_and_spec(cfg: Any, problems: list[str], kind: Any, *, model_found: bool) -> tuple[Any, Any]:
    """The family (given, or detected from the checkpoint) with its own rules and the spec of what the training
    type trains on it. A family detected from a file that is not there would be a guess: its rules would only add
    noise, so they wait."""
    if cfg.family == "auto" and not model_found:
        return None, None
    family = resolve_family(cfg)
    checks = check_family_options(cfg, family, spec_of=kind.spec if kind is not None else None)
    if cfg.family == "auto":  # a given --family's warnings came with the other option warnings
        for warning in checks.warnings:
            log.warning(warning)
    problems += checks.problems
    problems += base_weight_problems(cfg, family)
    return family, sized_spec(cfg, family, checks.spec, problems)


def _dataset(cfg: Any, seed: int, problems: list[str], family: Any, kind: Any) -> Any:
    """The training dataset, every image decoded once; its problems join the others."""
    try:
        dataset = build_train_dataset(cfg, seed, conditioning_use(cfg, family, kind))
    except ConfigError as error:
        problems += error.problems
        return None
    except DataError as error:
        problems.append(str(error))
        return None
    if kind is not None:
        kind.prepare_dataset(cfg, dataset)
        if not kind.preserves_outputs and any((s.custom_attributes or {}).get("diff_output_preservation")
                                               for s in dataset.subsets):
            problems.append(f"custom_attributes diff_output_preservation: {kind.title} training cannot compute the "
                            "base model's own prediction (only an adapter network can be switched off); remove it")
    if cfg.lr_scheduler == "reduce_lr_on_plateau" and not cfg.lr_scheduler_type and dataset.validation is None:
        problems.append("--lr_scheduler reduce_lr_on_plateau lowers the LR when the validation loss stops "
                        "improving: hold out images with --validation_split (or the dataset key validation_split)")
    asked = [f"--{n}" for n in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps")
             if getattr(cfg, n) is not None]
    if asked and dataset.validation is None:
        log.warning("%s: no images are held out for validation (validation_split is 0), so no validation runs",
                    ", ".join(asked))
    problems += text_cache_problems(cfg, dataset)
    return dataset


def conditioning_use(cfg: Any, family: Any, kind: Any) -> ConditioningUse:
    """What the run does with `conditioning_data_dir` images: the training type's use when it has one (a
    ControlNet needs them), else the model's (an image-editing model needs a reference per image), else loss
    masks only, as sd-scripts."""
    if kind is not None and kind.conditioning != ConditioningUse.MASK:
        return kind.conditioning
    return (family or ModelFamily()).conditioning_use(cfg)


def _text_cache(cfg: Any, family: Any, spec: Any, dataset: Any, problems: list[str]) -> CaptionCache | None:
    """The run's text-encoder cache, its files checked now; the encoders still load when sample prompts or a
    trained encoder need them."""
    if family is None or dataset is None or problems:
        return None
    wanted = bool(cfg.sample_prompts) or bool(spec is not None and spec.train_text_encoder)
    try:
        return plan_text_cache(cfg, dataset, family.text_cache_format, encoders_wanted=wanted)
    except ConfigError as error:
        problems += error.problems
        return None


def _plan(cfg: Any, family: Any, dataset: Any, text_cache: CaptionCache | None, memory: list[str]) -> TrainingPlan | None:
    """The run's length (printed on the main process), once the family and the dataset are known."""
    if family is None or dataset is None:
        return None
    plan = make_plan(cfg, family.name, len(dataset), num_processes=distributed.world_size_from_env())
    dataset.set_training_length(plan.max_train_steps, cfg.gradient_accumulation_steps)
    if distributed.rank_from_env() == 0:
        batch = distributed.effective_batch_message(dataset, plan.num_processes, cfg.gradient_accumulation_steps)
        text = "\n" + text_cache.describe() if text_cache is not None else ""
        module = family.network_module(cfg.network_module)  # the family's LoRA when left out or networks.lora
        print(format_plan(cfg, plan, format_summary(dataset.summary()), module) + text + "\n" + batch
              + "".join("\n" + line for line in memory), flush=True)
    return distributed.per_process_plan(plan)  # resume positions count this process's batches


def optimizer_problems(cfg: Any, total_steps: int) -> list[str]:
    """--optimizer_type/--optimizer_args and --lr_scheduler/--lr_scheduler_args, checked by building both for
    real over a one-element parameter: the same code and the same class signatures as the run, so whatever the
    run would refuse is refused here (an unknown name, a missing package, an argument the class does not take,
    a value it rejects). The builders' advice is said once, by the run."""
    from lorakit.training.optim import build_optimizer
    from lorakit.training.schedulers import build_lr_scheduler

    probe = [{"params": [torch.zeros(1, requires_grad=True)], "lr": cfg.learning_rate}]
    problems: list[str] = []
    with _quiet("lorakit", "lorakit.training.optim", "lorakit.training.schedulers"):
        try:
            optimizer = build_optimizer(cfg, probe)
        except ConfigError as error:
            problems += error.problems
            if cfg.lr_scheduler == "adafactor":  # that schedule is Adafactor's own: nothing to check it on
                return problems
            # the schedule's own options are checked on a plain optimizer
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate or 1.0)
        try:
            build_lr_scheduler(cfg, optimizer, max(1, total_steps))
        except ConfigError as error:
            problems += error.problems
    return problems


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def before_loading_problems(cfg: Any, plan: TrainingPlan | None) -> list[str]:
    """Processes, destination, resume folder and start step, and sample prompts."""
    from lorakit.sampling.prompts import read_sample_prompts
    from lorakit.training.state import check_state_folder, read_train_state

    problems = distributed.config_problems(cfg) + destination_problems(cfg)
    resumed_step = None
    if cfg.resume:
        state_problems = check_state_folder(cfg.resume)
        problems += state_problems
        if not state_problems:
            resumed_step = read_train_state(cfg.resume).step
            changes, notes = resume_changes(cfg, cfg.resume)
            problems += changes
            for note in notes:
                log.warning(note)
    if plan is not None and not problems:
        message = initial_step_problem(cfg, plan, resumed_step)
        problems += [message] if message else []
    if cfg.sample_prompts:
        from lorakit.training.sample_events import sampling_problems

        try:
            problems += sampling_problems(cfg, read_sample_prompts(cfg.sample_prompts))
        except ConfigError as error:
            problems += error.problems
    return problems

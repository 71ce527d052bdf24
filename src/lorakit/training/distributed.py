"""Multi-process training (`accelerate launch --multi_gpu`, `torchrun`, several machines; DeepSpeed).

The LoRA modules live inside the frozen model, outside any DDP wrapper, so the loop averages their gradients
itself (`step.all_reduce_gradients`). What this module adds around that:

* the keyword arguments for `Accelerator` (process-group timeout, DDP options, the DeepSpeed plugin, and the
  CPU switch without which a CPU-only launch gives N unsynchronised trainings);
* the start-up check that accelerate sees as many processes as the launcher started (WORLD_SIZE);
* the per-process view of the plan, the effective batch size message, latent caching divided among the
  processes and sample prompts divided among them.

Only the main process writes LoRA files, states and tracker logs (`checkpoints.py`, accelerate's trackers).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch

from lorakit.data.cache import cache_dataset_latents
from lorakit.data.sharding import batches_per_process
from lorakit.errors import ConfigError

log = logging.getLogger("lorakit")
T = TypeVar("T")

DEEPSPEED_INSTALL_HINT = "pip install deepspeed (it needs a CUDA toolkit matching your PyTorch)"


# ------------------------------------------------------------------------------------------ launcher facts


def world_size_from_env() -> int:
    """The number of processes the launcher started (1 for a plain run)."""
    return _env_int("WORLD_SIZE", 1)


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (0 for a plain run)."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ConfigError([f"environment variable {name}={value!r} is not a whole number; check the launcher"]) from None


def has_accelerator_device() -> bool:
    """Whether a GPU-like device can hold each process (CUDA, or Intel XPU)."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


# ------------------------------------------------------------------------------------------ configuration


def config_problems(cfg: Any, world_size: int | None = None) -> list[str]:
    """Options that cannot work in this launch; found before any model loads."""
    world = world_size_from_env() if world_size is None else world_size
    problems: list[str] = []
    if getattr(cfg, "deepspeed", False):
        problems += deepspeed_problems(cfg)
    if world > 1 and getattr(cfg, "fused_backward_pass", False):
        # the fused pass steps each parameter inside backward, before the gradients could be averaged
        problems.append(f"--fused_backward_pass cannot be used with {world} processes: each parameter is updated "
                        "during backward, before the processes average their gradients; remove it")
    return problems


def deepspeed_problems(cfg: Any) -> list[str]:
    """What stands in the way of `--deepspeed`: the package, and NVMe offload without a path."""
    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"--deepspeed needs the DeepSpeed package, which is not installed: {DEEPSPEED_INSTALL_HINT}; "
                        "or remove --deepspeed to train with plain multi-GPU (DDP), which needs nothing extra")
    for kind in ("optimizer", "param"):
        device = getattr(cfg, f"offload_{kind}_device", None)
        if device == "nvme" and not getattr(cfg, f"offload_{kind}_nvme_path", None):
            problems.append(f"--offload_{kind}_device nvme needs --offload_{kind}_nvme_path (a folder on the NVMe drive)")
    return problems


def deepspeed_plugin_kwargs(cfg: Any) -> dict[str, Any]:
    """The arguments of accelerate's `DeepSpeedPlugin` for sd-scripts' DeepSpeed options (inventory §2.6)."""
    return {
        "zero_stage": cfg.zero_stage,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm or None,
        "offload_optimizer_device": cfg.offload_optimizer_device or "none",
        "offload_optimizer_nvme_path": cfg.offload_optimizer_nvme_path,
        "offload_param_device": cfg.offload_param_device or "none",
        "offload_param_nvme_path": cfg.offload_param_nvme_path,
        "zero3_init_flag": cfg.zero3_init_flag,
        "zero3_save_16bit_model": cfg.zero3_save_16bit_model,
    }


def deepspeed_plugin(cfg: Any, world_size: int) -> Any:
    """accelerate's DeepSpeed plugin with the batch sizes and precision DeepSpeed asks for up front."""
    from accelerate.utils import DeepSpeedPlugin

    problems = deepspeed_problems(cfg)
    if problems:
        raise ConfigError(problems)
    plugin = DeepSpeedPlugin(**deepspeed_plugin_kwargs(cfg))
    micro = int(cfg.train_batch_size or 1)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    plugin.deepspeed_config["train_batch_size"] = micro * cfg.gradient_accumulation_steps * world_size
    if cfg.fp16_master_weights_and_gradients:
        plugin.deepspeed_config.setdefault("fp16", {})["fp16_master_weights_and_grads"] = True
    return plugin


def accelerator_kwargs(cfg: Any, world_size: int | None = None) -> dict[str, Any]:
    """Extra keyword arguments for `Accelerator(...)` in this launch."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    world = world_size_from_env() if world_size is None else world_size
    kwargs: dict[str, Any] = {}
    if world > 1 and not has_accelerator_device():
        # without cpu=True accelerate ignores the launcher's process group on a CPU-only machine and every
        # process trains alone (feasibility notes §6); with it, the processes join over gloo
        kwargs["cpu"] = True
    handlers: list[Any] = []
    if cfg.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.ddp_timeout)))
    if cfg.ddp_gradient_as_bucket_view or cfg.ddp_static_graph:
        # these tune torch's DDP wrapper; lorakit reduces the LoRA gradients itself, so they only reach
        # modules accelerate wraps. Accepted so sd-scripts command lines run unchanged.
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=cfg.ddp_gradient_as_bucket_view,
                                                      static_graph=cfg.ddp_static_graph))
    if handlers:
        kwargs["kwargs_handlers"] = handlers
    if getattr(cfg, "deepspeed", False):
        kwargs["deepspeed_plugin"] = deepspeed_plugin(cfg, world)
    return kwargs


def check_process_count(accelerator: Any) -> None:
    """Refuse to train when the launcher started N processes but accelerate joined fewer of them.

    That happens, for example, under `torchrun` on a machine without a GPU when accelerate is not told to use
    the CPU, or with a broken launcher configuration: every process would then train its own copy of the
    LoRA on its own share of nothing-in-particular, and they would overwrite each other's files.
    """
    expected = world_size_from_env()
    seen = accelerator.num_processes
    if seen == expected:
        return
    raise ConfigError([
        f"the launcher started {expected} processes (WORLD_SIZE={expected}), but accelerate sees {seen} "
        f"(distributed type {accelerator.distributed_type}); the processes would train unsynchronised. "
        "Launch with `accelerate launch --multi_gpu --num_processes N -m lorakit train ...` or "
        "`torchrun --nproc_per_node N -m lorakit train ...`, and check `accelerate env`"
    ])


# ------------------------------------------------------------------------------------------ the run


def per_process_plan(plan: Any) -> Any:
    """The plan as one process runs it: its share of each epoch's batches.

    Resume positions (`start_position`) skip this process's batches, and the `ss_num_batches_per_epoch`
    metadata counts them, as sd-scripts writes the length of its per-process data loader.
    """
    if plan.num_processes <= 1:
        return plan
    return dataclasses.replace(plan, batches_per_epoch=batches_per_process(plan.batches_per_epoch, plan.num_processes))


def batch_sizes(dataset: Any) -> list[int]:
    """The batch size of each dataset in the run (a --dataset_config may give each its own)."""
    return sorted({int(part.spec.batch_size) for part in dataset.parts}) or [1]


def effective_batch_message(dataset: Any, num_processes: int, accumulation: int) -> str:
    """'effective batch size 16 = 2 per process × 4 processes × 2 accumulation steps'."""
    sizes = batch_sizes(dataset)
    factor = num_processes * max(1, accumulation)
    total = "/".join(str(size * factor) for size in sizes)
    per_process = "/".join(str(size) for size in sizes)
    plural = "es" if num_processes != 1 else ""
    steps = "s" if accumulation != 1 else ""
    return (f"  effective batch   {total} = {per_process} per process x {num_processes} process{plural} "
            f"x {accumulation} accumulation step{steps}")


def shard_dataset(dataset: Any, accelerator: Any) -> None:
    """Give this process its share of every epoch's batches."""
    dataset.shard(accelerator.process_index, accelerator.num_processes)


def cache_latents(dataset: Any, accelerator: Any, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                  **disk: Any) -> Any:
    """Encode the dataset's latents with the work divided among the processes.

    Each process encodes every N-th image (in bucket order, so chunks still share a bucket). On disk each
    writes its files, and after a barrier every process adopts the complete set (all entries are valid, so
    nothing is encoded twice). In memory the processes exchange what they encoded.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    progress = accelerator.is_main_process
    if world <= 1:
        return cache_dataset_latents(dataset, encode, batch_size, progress, **disk)
    ids = _image_share(dataset, rank, world)
    share = copy.copy(dataset)  # same subsets and settings, only this process's images
    share.images = [dataset.images[i] for i in ids]
    report = cache_dataset_latents(share, encode, batch_size, progress, **disk)
    if disk.get("to_disk"):
        accelerator.wait_for_everyone()
        cache_dataset_latents(dataset, encode, batch_size, False, **disk)
        return report
    _adopt_gathered_latents(dataset, ids, share)
    return report


def cache_text_outputs(cache: Any, accelerator: Any, encode: Callable[[list[str]], dict[str, torch.Tensor]],
                       batch_size: int) -> int:
    """Write the text cache's pending files with the work divided among the processes, as latents are: every
    process checked the files before loading (a barrier keeps anyone from writing before all have), writes every
    N-th pending file, and after a second barrier every process reads the complete set."""
    if not cache.pending:
        return 0
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        accelerator.wait_for_everyone()
    written = cache.write_pending(encode, batch_size, accelerator.is_main_process, rank, world)
    if world > 1:
        accelerator.wait_for_everyone()
    cache.adopt_pending()
    return written


def _image_share(dataset: Any, rank: int, world: int) -> list[int]:
    order = sorted(range(len(dataset.images)), key=lambda i: (dataset.images[i].choice.bucket, i))
    return order[rank::world]


def _adopt_gathered_latents(dataset: Any, ids: list[int], share: Any) -> None:
    """Collect every process's in-memory latents (keyed by local position) under the dataset's image ids."""
    from accelerate.utils import gather_object

    mine = {(ids[local], flip): latent for (local, flip), latent in share.latents.items()}
    alphas = {(ids[local], flip): alpha for (local, flip), alpha in share.cached_alpha.items()}
    latents: dict[tuple[int, bool], torch.Tensor] = {}
    cached_alpha: dict[tuple[int, bool], torch.Tensor] = {}
    for part_latents, part_alphas in gather_object([(mine, alphas)]):
        latents.update(part_latents)
        cached_alpha.update(part_alphas)
    dataset.latents, dataset.cached_alpha, dataset.latent_files = latents, cached_alpha, None


def prompts_for_process(prompts: Sequence[T], process_index: int, num_processes: int) -> list[T]:
    """This process's sample prompts: every N-th, so each process makes about the same number of images."""
    return list(prompts[process_index::max(1, num_processes)])


def uneven_prompts_warning(prompt_count: int, num_processes: int) -> str | None:
    """A warning when the sample prompts do not divide evenly among the processes (some then wait)."""
    if num_processes <= 1 or prompt_count % num_processes == 0:
        return None
    return (f"{prompt_count} sample prompts over {num_processes} processes: some processes make one image more "
            f"while the others wait; use a multiple of {num_processes} prompts to keep them equally busy")


def prepare_optimizer(accelerator: Any, network: torch.nn.Module, optimizer: Any) -> Any:
    """The optimizer wrapped by accelerate; under DeepSpeed the network goes into the engine with it.

    DeepSpeed owns the gradient reduction and the optimizer step, so it must see the trainable parameters'
    module; the forward pass still runs through the frozen model the LoRA modules are injected into.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _, prepared = accelerator.prepare(network, optimizer)
        return prepared
    return accelerator.prepare(optimizer)


def uses_deepspeed(accelerator: Any) -> bool:
    """Whether DeepSpeed reduces the gradients (then the loop's own all-reduce must not run)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED

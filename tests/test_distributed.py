"""Multi-process training on the CPU: 2 processes under `accelerate launch --multi_gpu` (gloo) stay in sync,
equal one process that accumulates the same two batches per step, write each file once, resume exactly (each
process with its own random states) and divide the sample prompts; plus the sharding, plan, launcher-check
and option helpers on their own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_worker import recorded_run
from helpers import write_dreambooth_folder
from lorakit.config import parse_train_args
from lorakit.data.build import build_train_dataset
from lorakit.data.sharding import batches_per_process, shard, shard_batch_plans
from lorakit.errors import ConfigError
from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
from lorakit.training import distributed
from lorakit.training.plan import make_plan, start_position

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    save_sd_diffusers_folder(build_tiny_sd("sd1", seed=0), root / "model")
    prompts = root / "prompts.txt"  # 3 prompts over 2 processes: process 0 makes #0 and #2, process 1 makes #1
    prompts.write_text("".join(f"sks toy {i} --w 64 --h 64 --s 2 --d {i}\n" for i in range(3)), encoding="utf-8")
    return {"root": root, "model": root / "model", "data": write_dreambooth_folder(root / "data"), "prompts": prompts}


def train_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    # 4 images x 2 repeats at batch 1: 8 batches per epoch, 4 per process with 2 processes
    return [
        f"--pretrained_model_name_or_path={world['model']}", f"--train_data_dir={world['data']}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora", "--network_dim=4",
        "--network_alpha=2", "--learning_rate=1e-2", "--seed=5", "--train_batch_size=1", "--lr_scheduler=cosine",
        "--max_data_loader_n_workers=0", *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(world) -> dict[str, dict]:
    """One launch of 2 processes: a run with a state at step 2, its resumption, and two caching runs (one samples)."""
    root = world["root"]
    runs = {
        "full": train_args(world, root / "full", "--max_train_steps=4", "--save_every_n_steps=2", "--save_state"),
        "resumed": train_args(world, root / "resumed", "--max_train_steps=4",
                              f"--resume={root / 'full' / 'tiny-step00000002-state'}"),
        "memory": train_args(world, root / "memory", "--max_train_steps=1", "--cache_latents",
                             f"--sample_prompts={world['prompts']}", "--sample_every_n_steps=1"),
        "disk": train_args(world, root / "disk", "--max_train_steps=1", "--cache_latents_to_disk",
                           "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}", str(WORKER),
        str(root / "result.pt"),
    ]
    for index, (name, args) in enumerate(runs.items()):
        command += (["---"] if index else []) + [name, "--", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = torch.load(root / "result.pt", weights_only=False)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    return {"ranks": [r["records"] for r in ranks], "stdout": done.stdout, "stderr": done.stderr}


def test_ranks_hold_identical_weights_after_every_step(two_processes):
    rank0, rank1 = two_processes["ranks"]
    for name in ("full", "resumed", "memory", "disk"):
        assert rank0[name]["weights"].shape[0] > 0
        assert torch.equal(rank0[name]["weights"], rank1[name]["weights"]), name
    assert len(rank0["full"]["weights"]) == 4
    # the processes trained on different batches: their losses differ
    assert rank0["full"]["losses"] != rank1["full"]["losses"]


def test_two_processes_equal_one_process_with_the_doubled_batch(world, two_processes, tmp_path):
    # process r takes batches r, r+2, ...: step k of 2 processes sees batches 2k and 2k+1, which one process
    # sees in step k with 2 accumulation steps (gradients averaged over both in both cases)
    single = recorded_run(train_args(world, tmp_path, "--max_train_steps=4", "--gradient_accumulation_steps=2"))
    both = two_processes["ranks"][0]["full"]["weights"]
    assert single["weights"].shape == both.shape
    torch.testing.assert_close(single["weights"], both, rtol=1e-4, atol=1e-6)
    pair_means = [(a + b) / 2 for a, b in zip(two_processes["ranks"][0]["full"]["losses"],
                                              two_processes["ranks"][1]["full"]["losses"])]
    torch.testing.assert_close(torch.tensor(single["losses"]), torch.tensor(pair_means), rtol=1e-4, atol=1e-6)


def test_only_the_main_process_writes_and_each_file_once(world, two_processes):
    root = world["root"]
    assert sorted(p.name for p in (root / "resumed").iterdir()) == ["tiny.safetensors"]
    assert sorted(p.name for p in (root / "full").iterdir()) == [
        "tiny-state", "tiny-step00000002-state", "tiny-step00000002.safetensors", "tiny.safetensors"]
    stdout = two_processes["stdout"]
    assert stdout.count("Training plan") == 4, "the plan is printed by the main process only, once per run"
    assert "effective batch   2 = 1 per process x 2 processes x 1 accumulation step" in stdout


def test_resume_under_two_processes_continues_where_it_stopped(world, two_processes):
    rank0 = two_processes["ranks"][0]
    full, resumed = rank0["full"], rank0["resumed"]
    assert resumed["start_step"] == 2 and len(resumed["weights"]) == 2
    assert torch.equal(resumed["weights"], full["weights"][2:])
    assert resumed["losses"] == full["losses"][2:]
    root = world["root"]
    a, b = load_file(root / "full" / "tiny.safetensors"), load_file(root / "resumed" / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_process_saves_and_restores_its_own_random_states(world, two_processes):
    state = world["root"] / "full" / "tiny-step00000002-state"
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    at_save = [ranks["full"]["rng"][1] for ranks in two_processes["ranks"]]  # after step 2, when the state was saved
    restored = [ranks["resumed"]["restored_rng"] for ranks in two_processes["ranks"]]
    assert not torch.equal(at_save[0]["noise"], at_save[1]["noise"]), "the processes draw different noise"
    for rank in range(2):
        assert torch.equal(restored[rank]["noise"], at_save[rank]["noise"]), rank
        assert torch.equal(restored[rank]["torch_cpu"], at_save[rank]["torch_cpu"]), rank
        saved = torch.load(state / f"random_states_{rank}.pkl", weights_only=False)
        assert torch.equal(saved["noise_generator"], at_save[rank]["noise"])


def test_sample_prompts_are_divided_among_the_processes(world, two_processes):
    rank0, rank1 = (ranks["memory"]["samples"] for ranks in two_processes["ranks"])
    numbers = [[name.split("_")[2] for name in names] for names in (rank0, rank1)]
    assert numbers == [["00", "02"], ["01"]], (rank0, rank1)  # each image keeps its prompt's number
    assert sorted(p.name for p in (world["root"] / "memory" / "sample").iterdir()) == sorted(rank0 + rank1)
    assert all(name.startswith("tiny_000001_") for name in rank0 + rank1)
    assert two_processes["stderr"].count("3 sample prompts over 2 processes") == 1, "the main process warns once"


def test_latent_caching_is_shared_by_the_processes(world, two_processes):
    rank0, rank1 = (ranks["memory"]["cache"] for ranks in two_processes["ranks"])
    assert rank0["memory"] == 4 and rank0 == rank1  # every process holds all 4 images' latents, the same ones
    disk0, disk1 = (ranks["disk"]["cache"] for ranks in two_processes["ranks"])
    assert disk0 == disk1 == {"files": 4}
    assert len(list((world["data"]).rglob("*_sd.npz"))) == 4


def test_text_encoder_cache_files_are_shared_by_the_processes(world, two_processes):
    """Each process writes every second missing file; afterwards both read all four captions' files."""
    assert [ranks["disk"]["text_files"] for ranks in two_processes["ranks"]] == [4, 4]
    assert len(list((world["data"]).rglob("*_sd_te.npz"))) == 4
    assert two_processes["stdout"].count("text encoders     loaded (4 *_sd_te.npz files to write)") == 1


# ---------------------------------------------------------------------------------------------- helpers


def test_shard_strides_and_pads_to_equal_lengths():
    items = list(range(7))
    shares = [shard(items, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    assert batches_per_process(7, 3) == 3 and shard([9], 2, 3) == [9]
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_dataset_shards_give_each_process_different_batches_of_one_epoch_order(world):
    cfg, _ = parse_train_args(train_args(world, world["root"] / "unused"))
    whole = build_train_dataset(cfg, 5)
    whole.set_epoch(2)
    order = whole.batch_plans()
    shares = []
    for rank in range(2):
        part = build_train_dataset(cfg, 5)
        part.shard(rank, 2)
        part.set_epoch(2)
        shares.append(part.batch_plans())
        assert len(part) == 4 and [p.index for p in shares[-1]] == [0, 1, 2, 3]
    assert [p.seed for p in shares[0]] == [p.seed for p in order[0::2]]
    assert [p.image_ids for p in shares[1]] == [p.image_ids for p in order[1::2]]
    assert shard_batch_plans(order, 0, 1) == order


def test_resume_position_counts_this_process_batches(world):
    cfg, _ = parse_train_args(train_args(world, world["root"] / "unused", "--max_train_steps=10"))
    plan = distributed.per_process_plan(make_plan(cfg, "sd", 8, num_processes=2))
    assert plan.batches_per_epoch == 4 and plan.steps_per_epoch == 4
    point = start_position(cfg, plan, 6)
    assert (point.epoch, point.skip_batches, point.global_step) == (2, 2, 6)


def test_effective_batch_message(world):
    cfg, _ = parse_train_args(train_args(world, world["root"] / "unused", "--train_batch_size=2"))
    dataset = build_train_dataset(cfg, 5)
    message = distributed.effective_batch_message(dataset, 4, 3)
    assert "effective batch   24 = 2 per process x 4 processes x 3 accumulation steps" in message


def test_launcher_process_count_must_match_accelerate(monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    distributed.check_process_count(accelerator)  # a plain run: WORLD_SIZE unset
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2.*accelerate sees 1"):
        distributed.check_process_count(accelerator)


def test_accelerator_kwargs_for_ddp_options(world):
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cfg, _ = parse_train_args(train_args(world, world["root"] / "unused", "--ddp_timeout=30",
                                         "--ddp_gradient_as_bucket_view", "--ddp_static_graph"), check_support=False)
    kwargs = distributed.accelerator_kwargs(cfg, world_size=2)
    assert kwargs.get("cpu") is (not distributed.has_accelerator_device())
    handlers = {type(h): h for h in kwargs["kwargs_handlers"]}
    assert handlers[InitProcessGroupKwargs].timeout == timedelta(minutes=30)
    ddp = handlers[DistributedDataParallelKwargs]
    assert ddp.gradient_as_bucket_view and ddp.static_graph
    assert distributed.accelerator_kwargs(cfg, world_size=1).get("cpu") is None


def test_deepspeed_options(world):
    cfg, _ = parse_train_args(train_args(world, world["root"] / "unused", "--deepspeed", "--zero_stage=3",
                                         "--offload_optimizer_device=cpu", "--offload_param_device=nvme"),
                              check_support=False)
    problems = distributed.config_problems(cfg, world_size=2)
    assert any("--offload_param_device nvme needs --offload_param_nvme_path" in p for p in problems)
    installed = shutil.which("deepspeed") is not None or _importable("deepspeed")
    assert any("--deepspeed needs the DeepSpeed package" in p for p in problems) is not installed
    kwargs = distributed.deepspeed_plugin_kwargs(cfg)
    assert kwargs["zero_stage"] == 3 and kwargs["offload_optimizer_device"] == "cpu"
    assert kwargs["offload_param_device"] == "nvme" and kwargs["gradient_accumulation_steps"] == 1


def test_sample_prompts_divided_among_processes():
    prompts = [f"p{i}" for i in range(5)]
    assert [distributed.prompts_for_process(prompts, r, 2) for r in range(2)] == [["p0", "p2", "p4"], ["p1", "p3"]]
    assert "5 sample prompts over 2 processes" in distributed.uneven_prompts_warning(5, 2)
    assert distributed.uneven_prompts_warning(4, 2) is None and distributed.uneven_prompts_warning(5, 1) is None


def test_state_from_fewer_processes_gives_rank_0_random_states_but_keeps_own_noise(tmp_path, caplog):
    from lorakit.training.state import TrainingState, load_state, save_state

    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    live = TrainingState(network, optimizer, None, torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    saved_cpu = torch.get_rng_state()
    folder = save_state(tmp_path / "state", live, epoch=1, step=2)  # one process: rank 0's file only
    assert sorted(p.name for p in folder.glob("random_states_*")) == ["random_states_0.pkl"]
    own = torch.Generator().manual_seed(6)  # process 1's noise seed
    torch.manual_seed(0)
    load_state(folder, TrainingState(network, optimizer, None, own), rank=1)
    assert torch.equal(torch.get_rng_state(), saved_cpu)
    assert torch.equal(own.get_state(), torch.Generator().manual_seed(6).get_state())
    assert "no random states of process 1" in caplog.text


def test_deepspeed_leaves_gradient_averaging_to_the_engine(monkeypatch):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lorakit.training.step import all_reduce_gradients

    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)

    def reduce(*_args, **_kwargs):
        raise AssertionError("reduced under DeepSpeed")

    fake = SimpleNamespace(num_processes=2, reduce=reduce)
    monkeypatch.setattr(distributed, "uses_deepspeed", lambda accelerator: True)
    all_reduce_gradients(fake, [param])
    monkeypatch.undo()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD([param], lr=0.1)
    assert not distributed.uses_deepspeed(accelerator)
    assert distributed.prepare_optimizer(accelerator, torch.nn.Linear(1, 1), optimizer).optimizer is optimizer


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None

"""--blocks_to_swap: the shared schedule (common/block_swap.py) and FLUX / SD3 training with it on the CPU,
where the "device" is the CPU itself and every move is a plain copy, so results must not change at all."""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import family_args_of, write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.families.flux.targets import transformer_targets
from lorakit.families.common import block_swap
from lorakit.families.common.block_swap import BlockSwapper, install_block_swap
from lorakit.families.common.layers import to_fp8
from lorakit.families.flux.network_args import FluxNetworkArgs


def flux_network_args(cfg) -> FluxNetworkArgs:
    from lorakit.families.flux.family import FluxFamily

    return family_args_of(FluxFamily(), cfg)


# ---------------------------------------------------------------------------------------------------------
# The schedule on a chain of small blocks
# ---------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.norm(self.fc1(x))))


class Chain(nn.Module):
    def __init__(self, n: int, checkpointed: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.adapter = nn.Linear(8, 8, bias=False)  # trainable, like a LoRA factor: never swapped
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.adapter(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x.square().mean()


def expected_schedule(n: int, swap: int) -> tuple[list[set[int]], list[set[int]]]:
    """sd-scripts' rule, simulated: the blocks on the device before each block's forward and backward."""
    resident = set(range(n - swap))
    before_forward = []
    for j in range(n):
        before_forward.append(set(resident))
        if j < swap:
            resident = (resident - {j}) | {n - swap + j}
    before_backward: list[set[int]] = [set() for _ in range(n)]
    for b in reversed(range(n)):
        before_backward[b] = set(resident)
        done = n - b - 1
        if 0 < done <= swap:
            resident = (resident - {n - done}) | {swap - done}
    assert resident == set(range(n - swap))  # a full pass ends where prepare() starts
    return before_forward, before_backward


def run_chain(n: int, swap: int, checkpointed: bool = False):
    torch.manual_seed(0)
    model = Chain(n, checkpointed)
    model.blocks.requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    reference = model(x)
    reference.backward()
    ref_grads = (x.grad.clone(), model.adapter.weight.grad.clone())
    x.grad = None
    model.adapter.weight.grad = None

    swapper = install_block_swap(model, [("blocks", model.blocks, swap)], "cpu")[0]
    seen_forward: list[set[int]] = [set() for _ in range(n)]
    seen_backward: list[set[int]] = [set() for _ in range(n)]

    def on_device() -> set[int]:
        return {i for i in range(n) if swapper.weights_on_device(i)}

    for index, blk in enumerate(model.blocks):  # registered after the swapper's own hooks, so they see its work
        blk.register_forward_pre_hook(lambda m, a, i=index: None if block_swap._in_backward() else seen_forward.__setitem__(i, on_device()))
        blk.register_full_backward_pre_hook(lambda m, g, i=index: seen_backward.__setitem__(i, on_device()))
    storages = {w.data_ptr() for i in range(n - swap) for w in swapper.weights[i].values()}
    results = []
    for _ in range(2):  # the second pass starts from where the first left the blocks
        loss = model(x)
        loss.backward()
        results.append((loss.detach().clone(), x.grad.clone(), model.adapter.weight.grad.clone()))
        x.grad = None
        model.adapter.weight.grad = None
        assert on_device() == set(range(n - swap))
    return reference.detach(), ref_grads, results, swapper, seen_forward, seen_backward, storages


@pytest.mark.parametrize("n,swap", [(6, 1), (6, 2), (6, 4), (3, 1)])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_schedule_follows_the_rule_and_changes_nothing(n, swap, checkpointed):
    reference, ref_grads, results, swapper, seen_forward, seen_backward, storages = run_chain(n, swap, checkpointed)
    want_forward, want_backward = expected_schedule(n, swap)
    assert seen_forward == want_forward
    assert seen_backward == want_backward
    for j in range(n):
        assert j in seen_forward[j] and j in seen_backward[j]
    for loss, x_grad, adapter_grad in results:
        assert torch.equal(loss, reference)
        assert torch.equal(x_grad, ref_grads[0]) and torch.equal(adapter_grad, ref_grads[1])
    log = swapper.schedule_log
    assert not [e for e in log if e[0] == "fallback"]
    swaps = [e for e in log if e[0] == "swap"]
    assert [(e[2], e[3]) for e in swaps if e[1] == "forward"] == [(i, n - swap + i) for i in range(swap)] * 2
    assert [(e[2], e[3]) for e in swaps if e[1] == "backward"] == [(n - k, swap - k) for k in range(1, swap + 1)] * 2
    assert all(e[4] == 2 for e in swaps)  # both linear weights reused the outgoing block's storage
    # the device storages are the ones prepare() left: swapping reuses them and allocates nothing new
    assert {w.data_ptr() for i in range(n) if swapper.weights_on_device(i) for w in swapper.weights[i].values()} == storages


def test_only_frozen_linear_weights_move():
    torch.manual_seed(0)
    model = Chain(4)
    model.blocks.requires_grad_(False)
    model.blocks[3].fc2.weight.requires_grad_(True)  # a trainable weight stays out of the swap
    swapper = BlockSwapper(model.blocks, 2, "cpu")
    assert set(swapper.weights[3]) == {"fc1"} and set(swapper.weights[0]) == {"fc1", "fc2"}
    with pytest.raises(ValueError):
        BlockSwapper(model.blocks, 4, "cpu")


def test_forward_only_passes_are_put_back_by_prepare():
    """Sampling runs forward passes without backward: the next forward's prepare() trades the blocks back."""
    torch.manual_seed(0)
    model = Chain(5)
    model.requires_grad_(False)
    x = torch.randn(2, 8)
    reference = model(x)
    swapper = install_block_swap(model, [("blocks", model.blocks, 2)], "cpu")[0]
    with torch.no_grad():
        outputs = [model(x) for _ in range(3)]
    assert all(torch.equal(o, reference) for o in outputs)
    assert not [e for e in swapper.schedule_log if e[0] == "fallback"]
    swapper.prepare()
    assert [i for i in range(5) if swapper.weights_on_device(i)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------
# What the device holds: only the resident blocks' weights, at every moment of forward and backward
# ---------------------------------------------------------------------------------------------------------


class DeviceLedger:
    """Bytes of weight-shaped storage on the "device" (on the CPU: every storage that is not one of the
    swapper's host buffers): the swappable weights themselves plus whatever autograd saved for backward that is
    shaped like a weight (a transposed view of an old storage, an upcast copy). A storage counts once however
    many tensors share it, and for as long as anything keeps it alive."""

    def __init__(self, swappers: list[BlockSwapper]):
        self.swappers = swappers
        self.weights = [w for s in swappers for block in s.weights for w in block.values()]
        self.shapes = {tuple(w.shape) for w in self.weights} | {tuple(w.shape)[::-1] for w in self.weights}
        self.saved: list[weakref.ref] = []
        self.seen: list[int] = []

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) in self.shapes:
            self.saved.append(weakref.ref(tensor))
        return tensor

    def device_bytes(self) -> int:
        host = {b.untyped_storage().data_ptr() for s in self.swappers for b in s.host.values()}
        alive = self.weights + [t for t in (ref() for ref in self.saved) if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        return sum(size for ptr, size in storages.items() if ptr not in host)

    def record(self, *_):
        self.seen.append(self.device_bytes())

    def watch(self, blocks) -> None:
        """Record after every block's forward and before every block's backward (after the swapper's hooks)."""
        for block in blocks:
            block.register_forward_hook(lambda m, a, o: None if block_swap._in_backward() else self.record())
            block.register_full_backward_pre_hook(self.record)


def resident_bytes(swapper: BlockSwapper) -> int:
    keep = swapper.n - swapper.num_swap
    return sum(w.untyped_storage().nbytes() for block in swapper.weights[:keep] for w in block.values())


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_device_holds_only_the_resident_blocks(fp8, checkpointed):
    """Swapped-out blocks must free their device storage: nothing (no saved upcast, no old view) keeps it."""
    torch.manual_seed(0)
    model = Chain(6, checkpointed)
    model.blocks.requires_grad_(False)
    if fp8:
        to_fp8(model.blocks)
    x = torch.randn(3, 8, requires_grad=True)
    reference = model(x)
    reference.backward()
    ref_grad = model.adapter.weight.grad.clone()
    model.adapter.weight.grad = None
    swapper = install_block_swap(model, [("blocks", model.blocks, 3)], "cpu")[0]
    ledger = DeviceLedger([swapper])
    ledger.watch(model.blocks)
    for _ in range(2):
        with ledger.hooks():
            loss = model(x)
        loss.backward()
        assert torch.equal(loss, reference) and torch.equal(model.adapter.weight.grad, ref_grad)
        model.adapter.weight.grad = None
    assert len(ledger.seen) == 2 * 2 * 6
    assert max(ledger.seen) == resident_bytes(swapper), ledger.seen



@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_host_buffers_are_allocated_once(checkpointed):
    """Host memory does not grow over a run: every weight that leaves the device goes into its block's own host
    buffer, made the first time and reused at every later step (pinned only when the device is a GPU)."""
    torch.manual_seed(0)
    model = Chain(6, checkpointed)
    model.blocks.requires_grad_(False)
    swapper = install_block_swap(model, [("blocks", model.blocks, 3)], "cpu")[0]
    x = torch.randn(3, 8, requires_grad=True)
    buffers = []
    for _ in range(3):
        model(x).backward()
        buffers.append({key: buffer.data_ptr() for key, buffer in swapper.host.items()})
    assert buffers[0] and buffers[0] == buffers[1] == buffers[2]
    assert len(buffers[0]) == sum(len(weights) for weights in swapper.weights)  # one per swappable weight, no more
    assert not any(buffer.is_pinned() for buffer in swapper.host.values())  # CPU run: nothing to pin for

def test_flux_fp8_with_lora_holds_only_the_resident_blocks():
    """The real transformer, fp8 base and a LoRA on every block layer (fused views included)."""
    from diffusers import FluxTransformer2DModel

    from lorakit.adapters.network import LoRANetwork
    from lorakit.families.flux.family import image_position_ids

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=6, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).requires_grad_(False)
    to_fp8(model)
    cfg = SimpleNamespace(network_dim=4, network_args=None, network_alpha=2.0)
    network = LoRANetwork(transformer_targets(model, flux_network_args(cfg), 2.0))
    network.apply_to()
    plan = [("double", model.transformer_blocks, 2), ("single", model.single_transformer_blocks, 4)]
    swappers = install_block_swap(model, plan, "cpu")
    ledger = DeviceLedger(swappers)
    ledger.watch([*model.transformer_blocks, *model.single_transformer_blocks])
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=gen), encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
        pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]),
        img_ids=image_position_ids(8, 8, torch.device("cpu"), torch.float32), txt_ids=torch.zeros(8, 3), return_dict=False,
    )
    with ledger.hooks():
        out = model(**inputs)[0]
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert max(ledger.seen) == sum(resident_bytes(s) for s in swappers), ledger.seen


# ---------------------------------------------------------------------------------------------------------
# Training FLUX and SD3 with and without --blocks_to_swap
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def recorded(monkeypatch):
    """The real training and swap installation, with their results kept for the assertions."""
    from lorakit.training import run as loop

    seen = {"results": [], "swappers": []}
    train, install = loop.train, block_swap.install_block_swap

    def recording_train(cfg, *args):
        result = train(cfg, *args)
        seen["results"].append(result)
        return result

    def recording_install(*args, **kwargs):
        swappers = install(*args, **kwargs)
        seen["swappers"].append(swappers)
        return swappers

    monkeypatch.setattr(loop, "train", recording_train)
    monkeypatch.setattr(block_swap, "install_block_swap", recording_install)
    return seen


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("data"), count=2, repeats=1)


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def common_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_dim=4", "--network_alpha=2", "--max_train_steps=2",
        "--learning_rate=1e-2", "--seed=1", "--max_data_loader_n_workers=0", "--network_train_unet_only",
    ]


def train_twice(args: list[str], swap_args: list[str], tmp_path: Path, recorded: dict):
    plain_out, swap_out = tmp_path / "plain", tmp_path / "swap"
    assert main(args(plain_out)) == 0
    assert not recorded["swappers"]
    assert main(args(swap_out) + swap_args) == 0
    plain, swapped = (read_lora(p / "tiny.safetensors") for p in (plain_out, swap_out))
    assert plain.keys() == swapped.keys()
    for key in plain:
        torch.testing.assert_close(swapped[key], plain[key], rtol=0, atol=0, msg=key)
    losses = [r.step_losses for r in recorded["results"]]
    assert len(losses[0]) == 2
    assert losses[1] == losses[0]
    assert any(v.abs().sum() > 0 for k, v in plain.items() if k.endswith("lora_up.weight"))  # it trained
    (swappers,) = recorded["swappers"]
    return swappers


def check_swapped(swapper: BlockSwapper, swap: int) -> None:
    log = swapper.schedule_log
    assert swapper.num_swap == swap
    assert not [e for e in log if e[0] == "fallback"]
    phases = [e[1] for e in log if e[0] == "swap"]
    assert phases.count("forward") == 2 * swap and phases.count("backward") == 2 * swap  # two steps


def test_flux_training_with_blocks_to_swap_matches(data_dir, tmp_path, recorded):
    from diffusers import FluxTransformer2DModel

    from lorakit.families.flux.tiny import build_tiny_flux, save_pipeline_folder

    comps = build_tiny_flux(0)
    torch.manual_seed(1)
    comps.denoiser = FluxTransformer2DModel(  # 4 double and 6 single blocks, so that some may be swapped
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=6, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()
    folder = save_pipeline_folder(comps, tmp_path / "flux")
    args = lambda out: common_args(folder, data_dir, out) + ["--family=flux", "--network_module=networks.lora_flux"]  # noqa: E731
    swappers = train_twice(args, ["--blocks_to_swap=4"], tmp_path, recorded)
    double, single = swappers  # 4 → 2 double and 4 single blocks (the most this model allows)
    check_swapped(double, 2)
    check_swapped(single, 4)
    assert main(args(tmp_path / "too_many") + ["--blocks_to_swap=5"]) == 2  # 5 → 2 double, 6 single: too many


@pytest.mark.parametrize("checkpointing", [["--gradient_checkpointing"], []], ids=["checkpointed", "saved_weights"])
def test_sd3_training_with_blocks_to_swap_matches(data_dir, tmp_path, recorded, checkpointing):
    """Without checkpointing autograd keeps views of the weights a block ran with: the last block (text stream
    without MLP) takes over only the storages whose names and shapes match, and a block must come back into the
    very storages it left, the others included, for the earlier blocks' backward to read their own weights."""
    from lorakit.families.sd3.tiny import build_tiny_sd3, save_pipeline_folder

    folder = save_pipeline_folder(build_tiny_sd3(0, "sd3", num_layers=5), tmp_path / "sd3")
    args = lambda out: common_args(folder, data_dir, out) + ["--network_module=networks.lora_sd3", *checkpointing]  # noqa: E731
    (swapper,) = train_twice(args, ["--blocks_to_swap=3"], tmp_path, recorded)
    check_swapped(swapper, 3)
    # block 4 (text stream without MLP) takes over block 2's storage where names and shapes match
    assert any(e[0] == "swap" and e[3] == 4 and e[4] > 0 for e in swapper.schedule_log)
    if checkpointing:
        assert main(args(tmp_path / "too_many") + ["--blocks_to_swap=4"]) == 2

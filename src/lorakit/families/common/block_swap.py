"""Block swap (`--blocks_to_swap N`): the last N blocks of a transformer's block list keep their linear
weights in (pinned) CPU memory and are streamed to the GPU while the model runs, as sd-scripts'
`custom_offloading_utils.ModelOffloader` does.

The schedule, for a list of n blocks of which N are swapped:

* `prepare()` (before every forward of the model): blocks [0, n−N) on the device, the `.weight` tensors of
  the linear layers of blocks [n−N, n) on the CPU. Everything else (biases, norms, buffers, adapters) stays on
  the device.
* forward: after block i < N has run, block i goes to the CPU and block n−N+i comes to the device into the
  very storage block i used (same name, shape and dtype; other weights get storage of their own). Before
  block j runs, the forward waits for its transfer.
* backward (full backward hooks): with k = n−b−1 blocks already back-propagated, the hook of block b sends
  block n−k to the CPU and brings block N−k back (if 0 < k ≤ N), then waits for block b−1 (if 0 < b ≤ N).
  After a full forward and backward the blocks are where `prepare()` puts them.

Only frozen (`requires_grad=False`) `weight` Parameters of `nn.Linear` modules move, so adapters that wrap a
block's linears (held outside the block) and their trainable parameters never leave the device. On CUDA the
copies run on a side stream ordered by events; on the CPU the "device" is the CPU itself and a move is a plain
copy between the block's storage and its host buffer, so the whole schedule (and its `schedule_log`) runs and
can be tested without a GPU.

Memory and correctness: the device holds the resident blocks' weights and nothing of a swapped-out block,
provided nothing else keeps its old storage alive. Autograd's saved tensors are the risk: a layer's backward
keeps a view of the weight storage it ran with (a weight already in the compute dtype is not copied by autocast,
and float32 runs save it as it is). That is harmless because the incoming block takes over exactly that storage
(name, shape and dtype must match) and every block comes back into the storages it left before its backward:
then block i's storages hold block i's weights again when its saved views are read. A weight with no match in
the incoming block (SD3's last block has no text-stream MLP and a narrower modulation) leaves its storage
unused; in a forward with gradients that storage is *parked* (kept for the block, not freed) and the block
returns into it, so the chain of hand-overs stays intact: without that, the earlier block whose storage it was
would run its backward on the weights of the block that took it over. Parked storages are what autograd keeps
alive anyway (they are dropped at the next `prepare()`). Upcast copies must not be saved at all (`Fp8Linear`
saves its float8 Parameter instead). `tests/test_block_swap.py` counts the live weight-shaped storages at every
step, and checks runs with and without checkpointing are bit-identical to runs without swap.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

log = logging.getLogger("lorakit")

# Blocks called with keyword arguments only (diffusers' transformers) have no positional inputs for a full
# backward hook, so PyTorch runs it when the gradients of the block's outputs are ready, i.e. just before the
# block's own backward; the schedule is the same either way (the hook sends away block b+1, never block b).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a gradient-checkpointed block recomputes its forward then)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def swappable_weights(block: nn.Module, include_trained: bool = False) -> dict[str, nn.Parameter]:
    """The frozen `weight` Parameters of the linear layers inside `block`, by module name; with
    `include_trained` the trained ones too (a full fine-tune, whose optimizer steps each block's weights
    during the backward pass, while the block is on the device)."""
    weights: dict[str, nn.Parameter] = {}
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module._parameters.get("weight")  # weightless views (fused LoRA targets) have none
        if isinstance(weight, nn.Parameter) and (include_trained or not weight.requires_grad):
            weights[name] = weight
    return weights


class BlockSwapper:
    """Keeps the last `num_swap` of `blocks` on the CPU and streams them through the device (see the module doc)."""

    def __init__(self, blocks: Sequence[nn.Module], num_swap: int, device: torch.device | str, name: str = "blocks",
                 include_trained: bool = False):
        self.blocks = list(blocks)
        self.n = len(self.blocks)
        self.num_swap = int(num_swap)
        if not 0 < self.num_swap < self.n:
            raise ValueError(f"{name}: can swap 1 to {self.n - 1} of {self.n} blocks, not {num_swap}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = name
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.weights = [swappable_weights(block, include_trained) for block in self.blocks]
        self.host: dict[tuple[int, str], torch.Tensor] = {}
        self.parked: dict[tuple[int, str], torch.Tensor] = {}  # device storages a block left unused (see above)
        self.resident = [True] * self.n  # whether a block's swapped weights are on the device (schedule view)
        self.events: dict[int, torch.cuda.Event] = {}
        self.schedule_log: list[tuple] = []
        self.handles: list = []
        self._compute_stream = None  # the stream the model runs on (CUDA), recorded at each submit
        self._placed = False

    # ------------------------------------------------------------------------------------------- state

    def _host_buffer(self, index: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The block's own CPU buffer for one weight (pinned on CUDA), allocated once."""
        key = (index, name)
        buffer = self.host.get(key)
        if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
            buffer = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=self.cuda)
            self.host[key] = buffer
        return buffer

    def _on_device(self, index: int, name: str, weight: torch.Tensor) -> bool:
        if self.cuda:
            return weight.device.type == "cuda"
        buffer = self.host.get((index, name))
        return buffer is None or weight.data_ptr() != buffer.data_ptr()

    def weights_on_device(self, index: int) -> bool:
        """Whether every swappable weight of block `index` is in device storage (read from the tensors)."""
        return all(self._on_device(index, name, w) for name, w in self.weights[index].items())

    def resident_blocks(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n) if self.resident[i])

    # ------------------------------------------------------------------------------------------- moves

    def _stream_context(self):
        return torch.cuda.stream(self.stream) if self.cuda else _NullContext()

    def _weight_to_host(self, index: int, name: str, weight: nn.Parameter, park: bool = False) -> None:
        """Copy the weight to its host buffer; with `park` the device storage it leaves is kept for its return."""
        if not self._on_device(index, name, weight):
            return
        buffer = self._host_buffer(index, name, weight)
        storage = weight.data
        buffer.copy_(storage, non_blocking=self.cuda)
        if self.cuda and storage.is_cuda:
            storage.record_stream(self.stream)  # not reused by the allocator before the copy is done
        if park:
            self.parked[(index, name)] = storage
        weight.data = buffer

    def _weight_to_device(self, index: int, name: str, weight: nn.Parameter, consumer) -> None:
        """Copy the weight into device storage: the storage it left parked, if any, else a new one."""
        if self._on_device(index, name, weight):
            return
        source = weight.data
        storage = self.parked.pop((index, name), None)
        if storage is not None:
            storage.copy_(source, non_blocking=self.cuda and source.is_pinned())
        elif self.cuda:
            storage = torch.empty(source.shape, dtype=source.dtype, device=self.device)
            storage.copy_(source, non_blocking=source.is_pinned())
        else:
            storage = source.clone()
        if self.cuda and consumer is not None:
            storage.record_stream(consumer)
        weight.data = storage

    def _exchange(self, out_index: int, in_index: int, park: bool = False) -> int:
        """Block `out_index` to the CPU, block `in_index` to the device in the storage it leaves; returns how
        many weights reused storage. With `park` (a forward with gradients) the outgoing block's storages that
        the incoming one cannot take are kept for its return. Runs in the current stream context."""
        outgoing, incoming = self.weights[out_index], self.weights[in_index]
        reused = set()
        for name, weight_in in incoming.items():
            weight_out = outgoing.get(name)
            if (
                weight_out is None or weight_out.shape != weight_in.shape or weight_out.dtype != weight_in.dtype
                or not self._on_device(out_index, name, weight_out) or self._on_device(in_index, name, weight_in)
            ):
                continue
            storage = weight_out.data
            buffer = self._host_buffer(out_index, name, weight_out)
            buffer.copy_(storage, non_blocking=self.cuda)  # same stream: done before the storage is overwritten
            storage.copy_(weight_in.data, non_blocking=self.cuda)
            weight_out.data = buffer
            weight_in.data = storage
            reused.add(name)
        for name, weight in outgoing.items():
            if name not in reused:
                self._weight_to_host(out_index, name, weight, park)
        for name, weight in incoming.items():
            if name not in reused:
                self._weight_to_device(in_index, name, weight, self._compute_stream)
        return len(reused)

    def submit(self, out_index: int, in_index: int, phase: str) -> None:
        """Start moving block `out_index` to the CPU and block `in_index` to the device (asynchronous on CUDA)."""
        if self.cuda:
            self._compute_stream = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(self._compute_stream)  # the blocks' last uses are enqueued before the copies
        # in a forward with gradients the outgoing block's backward is still to come: park what it leaves
        park = phase == "forward" and torch.is_grad_enabled()
        with self._stream_context():
            reused = self._exchange(out_index, in_index, park)
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
                self.events[in_index] = event
        self.resident[out_index] = False
        self.resident[in_index] = True
        self.schedule_log.append(("swap", phase, out_index, in_index, reused))

    def wait(self, index: int) -> None:
        """Make the compute stream wait until block `index` has arrived."""
        event = self.events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if not self.resident[index]:
            # not scheduled (e.g. a partial pass ran without prepare): bring it over synchronously
            log.warning("block swap (%s): block %d was not on the device; moving it now", self.name, index)
            self.schedule_log.append(("fallback", index))
            for name, weight in self.weights[index].items():
                self._weight_to_device(index, name, weight, None)
            self.resident[index] = True

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.events.clear()

    def prepare(self) -> None:
        """Blocks [0, n−N) fully on the device, the swapped weights of blocks [n−N, n) on the CPU."""
        self._sync()
        self.parked.clear()  # the last pass's backward, if any, is over
        if not self._placed:
            self._place_unswapped_tensors()
        keep = self.n - self.num_swap
        self.resident = [self.weights_on_device(i) for i in range(self.n)]
        to_host = [i for i in range(keep, self.n) if any(self._on_device(i, k, w) for k, w in self.weights[i].items())]
        to_device = [i for i in range(keep) if not self.resident[i]]
        if self.cuda:
            self._compute_stream = torch.cuda.current_stream(self.device)
        for out_index, in_index in zip(to_host, to_device):  # a forward-only pass left them swapped: trade back
            self._exchange(out_index, in_index)
        for index in to_host[len(to_device):]:
            for name, weight in self.weights[index].items():
                self._weight_to_host(index, name, weight)
        for index in to_device[len(to_host):]:
            for name, weight in self.weights[index].items():
                self._weight_to_device(index, name, weight, None)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the host buffers must be complete
        self.resident = [i < keep for i in range(self.n)]
        self.schedule_log.append(("prepare", self.resident_blocks()))

    def _place_unswapped_tensors(self) -> None:
        """Everything of every block except the swappable weights goes to the device (once); swapped weights
        still on the CPU are copied into their pinned buffers."""
        keep = self.n - self.num_swap
        for index, block in enumerate(self.blocks):
            move_tensors(block, self.device, skip={id(w) for w in self.weights[index].values()})
            if self.cuda and index >= keep:
                for name, weight in self.weights[index].items():
                    if weight.device.type == "cpu":
                        buffer = self._host_buffer(index, name, weight)
                        buffer.copy_(weight.data)
                        weight.data = buffer
        self._placed = True

    # ------------------------------------------------------------------------------------------- hooks

    def attach(self) -> "BlockSwapper":
        """Forward pre/post hooks and full backward hooks on every block that takes part in the schedule."""
        self.detach()
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._forward_pre_hook(index)))
            if index < self.num_swap:
                self.handles.append(block.register_forward_hook(self._forward_hook(index)))
            hook = self._backward_hook(index)
            if hook is not None:
                self.handles.append(block.register_full_backward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _forward_pre_hook(self, index: int):
        def hook(module, args):
            if _in_backward():
                return None  # a checkpointed block recomputing: the backward schedule already placed it
            self.wait(index)
            self.schedule_log.append(("forward", index, self.resident_blocks()))
            return None

        return hook

    def _forward_hook(self, index: int):
        def hook(module, args, output):
            if not _in_backward():
                self.submit(index, self.n - self.num_swap + index, "forward")
            return None

        return hook

    def _backward_hook(self, index: int):
        done = self.n - index - 1  # blocks already back-propagated when this block's hook runs
        swapping = 0 < done <= self.num_swap
        waiting = 0 < index <= self.num_swap
        if not swapping and not waiting:
            return None

        def hook(module, grad_input, grad_output):
            if swapping:
                self.submit(self.n - done, self.num_swap - done, "backward")
            if waiting:
                self.wait(index - 1)
            self.schedule_log.append(("backward_hook", index, self.resident_blocks()))
            return None

        return hook


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def move_tensors(root: nn.Module, device: torch.device, skip: set[int] = frozenset()) -> None:
    """Every parameter and buffer under `root` to `device`, except the parameters whose id is in `skip`
    (Parameters keep their identity, so optimizers and adapters holding them are unaffected)."""
    device = torch.device(device)
    for module in root.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in skip and param.device != device:
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def install_block_swap(root: nn.Module, plan: Iterable[tuple[str, Sequence[nn.Module], int]], device,
                       include_trained: bool = False) -> list[BlockSwapper]:
    """One `BlockSwapper` per (name, blocks, N) with N > 0, attached and prepared now and again before every
    forward of `root` (a forward pre-hook), so training, validation and sampling passes all start from the same
    placement. Whatever of `root` lies outside the swapped weights is moved to `device` first, so a model still
    on the CPU never has the swapped weights on the device (the peak stays low)."""
    swappers = [BlockSwapper(blocks, n, device, name, include_trained).attach() for name, blocks, n in plan if n]
    swapped = {id(w) for s in swappers for i in range(s.n - s.num_swap, s.n) for w in s.weights[i].values()}
    move_tensors(root, device, skip=swapped)
    for swapper in swappers:
        swapper.prepare()

    def prepare_all(module, args):
        for swapper in swappers:
            swapper.prepare()
        return None

    handle = root.register_forward_pre_hook(prepare_all)
    for swapper in swappers:
        swapper.handles.append(handle)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return swappers

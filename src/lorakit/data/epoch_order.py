"""One epoch's batches, computed when asked for: no list of repeated image ids is ever built.

An epoch holds every image `repeats` times, grouped by (dataset, bucket); each group is shuffled and cut into
batches, and the batches of all groups are shuffled together (inventory §3.5). A folder named `1000000_x` or a
`num_repeats` of 10^9 would make that a list of 10^9 entries, so the epoch is instead described by a few
counts per image, and both shuffles are random-access permutations (`Permutation`): batch `i` of an epoch is
found in O(batch size · log images) time and O(images) memory, for 10 repeats or for 10^9.

Every batch carries its own seed (from the run seed, the epoch and its position), so augmentations and caption
processing do not depend on which process or data-loader worker loads it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

Size = tuple[int, int]
_MASK64 = (1 << 64) - 1


def mix64(value: int) -> int:
    """SplitMix64's finaliser: a fixed, well-spread 64-bit hash of an integer (not for security)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from several integers (run seed, epoch, position, ...)."""
    value = 0
    for part in parts:
        value = mix64(value ^ (part & _MASK64))
    return value


class Permutation:
    """A shuffle of range(n) that can be read at any position without building it.

    A 4-round Feistel network is a bijection of [0, 4^k); cycle-walking (re-applying it until the value falls
    below n) restricts it to a bijection of [0, n). The domain is less than 4n, so a lookup takes at most a few
    rounds on average.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        self.n = n
        bits = max(2, (max(n, 1) - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [derive_seed(seed, r) for r in range(self.ROUNDS)]

    def _round_trip(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        value = self._round_trip(index)
        while value >= self.n:
            value = self._round_trip(value)
        return value

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class BatchPlan:
    """One pre-formed batch: indices into `TrainDataset.images` from one bucket, its seed and position."""

    bucket: Size
    image_ids: tuple[int, ...]
    seed: int
    epoch: int = 0
    index: int = 0  # position in the epoch (in this process's share of it)


@dataclass(frozen=True)
class BucketGroup:
    """The images of one (dataset, bucket) pair, each counted `repeats` times, cut into batches of `batch_size`."""

    dataset_index: int
    bucket: Size
    batch_size: int
    image_ids: tuple[int, ...]
    repeat_ends: tuple[int, ...]  # cumulative repeats: image k fills slots [repeat_ends[k-1], repeat_ends[k])

    @property
    def slots(self) -> int:
        return self.repeat_ends[-1] if self.repeat_ends else 0

    @property
    def batches(self) -> int:
        return -(-self.slots // self.batch_size)

    def image_at(self, slot: int) -> int:
        return self.image_ids[bisect.bisect_right(self.repeat_ends, slot)]


def bucket_groups(entries: Sequence[tuple[int, Size, int, int]], batch_sizes: Sequence[int]) -> list[BucketGroup]:
    """Groups from (dataset index, bucket, image id, repeats) entries, in (dataset, bucket) order."""
    members: dict[tuple[int, Size], list[tuple[int, int]]] = {}
    for dataset_index, bucket, image_id, repeats in entries:
        if repeats > 0:
            members.setdefault((dataset_index, bucket), []).append((image_id, repeats))
    groups = []
    for (dataset_index, bucket), images in sorted(members.items()):
        ends, total = [], 0
        for _, repeats in images:
            total += repeats
            ends.append(total)
        groups.append(BucketGroup(dataset_index, bucket, batch_sizes[dataset_index],
                                  tuple(i for i, _ in images), tuple(ends)))
    return groups


class EpochBatches(Sequence[BatchPlan]):
    """The batches of one epoch, in order, for process `rank` of `world_size`.

    Every process forms the same epoch order and keeps the batches at positions rank, rank + world, …, padded
    from the start of the epoch so that all processes get the same count (see `lorakit.data.sharding`).
    """

    def __init__(self, groups: Sequence[BucketGroup], seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        self.groups = list(groups)
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.epoch_seed = derive_seed(seed, epoch)
        self.batch_ends: list[int] = []
        total = 0
        for group in self.groups:
            total += group.batches
            self.batch_ends.append(total)
        self.total = total
        self.order = Permutation(total, derive_seed(self.epoch_seed, 1))
        self._group_shuffles: dict[int, Permutation] = {}
        self.length = total if world_size == 1 else -(-total // world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(index)
        position = (index * self.world_size + self.rank) % self.total
        return self._plan(position, index)

    def __iter__(self) -> Iterator[BatchPlan]:
        return self.starting_at(0)

    def starting_at(self, first: int) -> Iterator[BatchPlan]:
        """The batches from position `first` on, computed one at a time."""
        return (self[i] for i in range(first, self.length))

    def _shuffle_of(self, group_index: int) -> Permutation:
        shuffle = self._group_shuffles.get(group_index)
        if shuffle is None:
            group = self.groups[group_index]
            shuffle = Permutation(group.slots, derive_seed(self.epoch_seed, 2, group_index))
            self._group_shuffles[group_index] = shuffle
        return shuffle

    def _plan(self, position: int, index: int) -> BatchPlan:
        """The batch at `position` of the whole epoch's order, numbered `index` in this process's share."""
        shuffled = self.order[position]
        group_index = bisect.bisect_right(self.batch_ends, shuffled)
        group = self.groups[group_index]
        within = shuffled - (self.batch_ends[group_index - 1] if group_index else 0)
        shuffle = self._shuffle_of(group_index)
        first, last = within * group.batch_size, min((within + 1) * group.batch_size, group.slots)
        ids = tuple(group.image_at(shuffle[slot]) for slot in range(first, last))
        seed = derive_seed(self.epoch_seed, 3, position) >> 1  # 63 bits, as random.getrandbits(63) gave
        return BatchPlan(group.bucket, ids, seed, self.epoch, index)

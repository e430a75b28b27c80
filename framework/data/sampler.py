"""Epoch-keyed, sharded sampling: every sample of every epoch gets a unique key that seeds its augmentation."""

from __future__ import annotations

import mindspore.dataset as ds
import numpy as np


def shard_size(num_items: int, num_shards: int, pad: bool, shard_id: int = 0) -> int:
    """Items per shard: with ``pad`` every shard gets ``ceil(num_items / num_shards)``, else its exact share."""
    return -(-num_items // num_shards) if pad else len(range(shard_id, num_items, num_shards))


class ShardSampler(ds.Sampler):
    """Yields ``epoch * num_items + index`` for this shard's share of a (shuffled) epoch.

    The permutation depends only on ``seed`` and the epoch, so every rank draws the same one and
    takes every ``num_shards``-th item from ``shard_id``: shards are disjoint and together cover the
    dataset. With ``pad`` the permutation wraps around so every shard gets the same number of items
    (data-parallel ranks must run the same number of steps); without it (evaluation) nothing repeats.
    Sources recover the index as ``key % num_items``; random ops seed themselves from the key, which
    makes augmentation independent of worker scheduling. ``first_epoch`` starts the sequence later
    (a resumed run gets exactly the epochs it has not seen).
    """

    def __init__(
        self,
        num_items: int,
        shuffle: bool,
        seed: int,
        shard_id: int = 0,
        num_shards: int = 1,
        pad: bool = True,
        first_epoch: int = 0,
    ) -> None:
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}) with num_shards >= 1, got {shard_id}/{num_shards}")
        if num_items < 1:
            raise ValueError("cannot sample from an empty split")
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.shard_id, self.num_shards, self.pad = shard_id, num_shards, pad
        self.per_shard = shard_size(num_items, num_shards, pad, shard_id)
        self.epoch = first_epoch
        super().__init__(num_samples=self.per_shard)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This shard's item indices for ``epoch`` (in order of use)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle else None
        if order is None:
            order = np.arange(self.num_items)
        if self.pad:
            order = np.resize(order, self.per_shard * self.num_shards)  # wraps around to equal shard sizes
        return order[self.shard_id :: self.num_shards]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        for index in self.epoch_indices(epoch):
            yield int(epoch * self.num_items + index)

    def __len__(self) -> int:
        return self.per_shard

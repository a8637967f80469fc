"""Deterministic interleaving of sources by weight, with random access to any sample of a stage.

Sample ``i`` of a stage (counted from the stage start) is drawn from one source, and it is that source's
``k``-th sample of the stage. The stage is cut into blocks of ``block_size`` samples. The number of samples of
each source among the first ``n`` (for ``n`` a multiple of the block size) is the largest-remainder rounding of
``n * weight``, so the counts at block boundaries are within one sample of the exact proportion. Inside a
block each source's slots are spread evenly, with a seeded phase, so any stretch of consecutive samples (a
global batch) is close to the target proportions too (within about two samples per source). Locating a sample therefore costs one block
(O(block_size)), whatever its index, and reads no data.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .source import seeded_rng

MIN_BLOCK_SIZE = 1024
MIN_RELATIVE_WEIGHT = 1e-6  # keeps the block size bounded (it must give every source at least one slot)


class MixtureSchedule:
    def __init__(self, weights: list[float], seed_keys: tuple[int, ...]):
        total = float(sum(weights))
        self.fractions = np.array([w / total for w in weights], dtype=np.float64)
        if self.fractions.min() < MIN_RELATIVE_WEIGHT:
            raise ValueError(f"mixture weights {weights}: a weight below {MIN_RELATIVE_WEIGHT} of the total is not supported")
        # With block_size * fraction >= 2 for every source, the rounded prefix counts grow by at least one per
        # block for every source, so per-block counts are never negative (no "Alabama paradox").
        self.block_size = max(MIN_BLOCK_SIZE, math.ceil(2.0 / self.fractions.min()))
        self.seed_keys = seed_keys
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def prefix_counts(self, n: int) -> np.ndarray:
        """Samples per source among the first ``n`` samples of the stage."""
        block, rest = divmod(n, self.block_size)
        counts = self._rounded_counts(block * self.block_size)
        if rest:
            sources, _ = self._block(block)
            counts = counts + np.bincount(sources[:rest], minlength=len(self.fractions))
        return counts

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For stage sample indices: their source and their index among that source's samples of the stage."""
        indices = np.asarray(indices, dtype=np.int64)
        sources = np.empty_like(indices)
        ordinals = np.empty_like(indices)
        for block in np.unique(indices // self.block_size):
            chosen = indices // self.block_size == block
            block_sources, block_ordinals = self._block(int(block))
            within = indices[chosen] - block * self.block_size
            sources[chosen] = block_sources[within]
            ordinals[chosen] = block_ordinals[within]
        return sources, ordinals

    def _rounded_counts(self, n: int) -> np.ndarray:
        """Largest-remainder rounding of n * fractions (ties go to the lower source index)."""
        exact = n * self.fractions
        counts = np.floor(exact).astype(np.int64)
        shortfall = n - int(counts.sum())
        by_remainder = np.argsort(-(exact - counts), kind="stable")
        counts[by_remainder[:shortfall]] += 1
        return counts

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each slot of a block, and each slot's index among its source's samples of the stage."""
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        before = self._rounded_counts(block * self.block_size)
        in_block = self._rounded_counts((block + 1) * self.block_size) - before
        # Spread each source's slots evenly over the block, with a seeded phase per source: slot k of source s
        # sits at (k + phase_s) / count_s. Sorting all slots by position interleaves the sources smoothly, so
        # any run of consecutive samples (a global batch) has close to the target proportions.
        phases = seeded_rng(*self.seed_keys, block).random(len(in_block))
        slot_sources = np.repeat(np.arange(len(in_block)), in_block)
        slot_ordinals = np.concatenate([np.arange(count) for count in in_block])
        positions = (slot_ordinals + phases[slot_sources]) / in_block[slot_sources]
        order = np.argsort(positions, kind="stable")
        sources = slot_sources[order]
        result = (sources, before[sources] + slot_ordinals[order])
        self._blocks[block] = result
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return result

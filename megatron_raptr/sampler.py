"""The path of a training step: which layers run at iteration t.

The path is a pure function of (seed, iteration, schedule, pipeline layout), so
every rank computes the same path with no communication. It never touches the
global RNGs, which Megatron seeds differently on every pipeline stage.
"""

import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_raptr.schedule import RaptrSchedule

# Separates the path stream from any other user of (seed, iteration).
_STREAM = 0x5241505452  # "RAPTR"


@dataclass(frozen=True)
class Path:
    iteration: int
    stage: int
    active: Tuple[int, ...]  # sorted 1-based global layer numbers
    scales: Dict[int, float]  # residual-update multiplier of each active layer
    # Whether the path gates evaluation too (stacking: the layers off it do not exist yet);
    # otherwise evaluation runs every layer, unscaled.
    gates_eval: bool = False

    def checksum(self) -> int:
        """A 31-bit digest of (iteration, active layers), for cross-rank sync checks."""
        return zlib.crc32(np.array((self.iteration, *self.active), dtype=np.int64).tobytes()) & 0x7FFFFFFF


class PathSampler:
    """Samples the step's path according to ``schedule.sampling``.

    ``layout`` lists, for each pipeline stage, how many consecutive layers it holds
    (Megatron builds a contiguous slice of layers per stage); it matters only for
    ``pipeline-balanced`` sampling. Default: a single stage with all layers.
    """

    def __init__(self, schedule: RaptrSchedule, seed: int, layout: Optional[Sequence[int]] = None):
        layout = tuple(layout) if layout is not None else (schedule.num_layers,)
        if sum(layout) != schedule.num_layers or min(layout) < 1:
            raise ValueError(f"pipeline layout {layout} does not split {schedule.num_layers} layers")
        self.schedule = schedule
        self.seed = seed
        bounds = np.cumsum((0,) + layout)
        self.groups = tuple(tuple(range(lo + 1, hi + 1)) for lo, hi in zip(bounds[:-1], bounds[1:]))
        fixed = set(schedule.fixed_layers)
        self._free = [[layer for layer in group if layer not in fixed] for group in self.groups]
        self._fixed_count = [len(group) - len(free) for group, free in zip(self.groups, self._free)]
        self._all_free = [layer for free in self._free for layer in free]
        self._keep = [self._keep_probabilities(index) for index in range(len(schedule.stages))]

    def path(self, iteration: int) -> Path:
        stage = self.schedule.stage_index(iteration)
        keep = self._keep[stage]
        if all(p == 1.0 for p in keep.values()):
            active = tuple(range(1, self.schedule.num_layers + 1))
        else:
            rng = np.random.default_rng((self.seed, iteration, _STREAM))
            active = tuple(sorted(self.schedule.fixed_layers + self._sample_free(stage, rng)))
        scales = {layer: self.schedule.scale(keep[layer]) for layer in active}
        return Path(iteration, stage, active, scales)

    def keep_probabilities(self, stage: int) -> Dict[int, float]:
        """Probability that each layer is on the path during ``stage``."""
        return dict(self._keep[stage])

    def _sample_free(self, stage: int, rng: np.random.Generator) -> Tuple[int, ...]:
        length = self.schedule.stages[stage].length
        if self.schedule.sampling == "bernoulli":
            draws = rng.random(len(self._all_free))
            return tuple(layer for layer, u in zip(self._all_free, draws) if u < self.schedule.keep_probability(stage))
        if self.schedule.sampling == "fixed-size":
            count = int(length) - len(self.schedule.fixed_layers)
            return tuple(int(layer) for layer in rng.choice(self._all_free, size=count, replace=False))
        counts, tied, extra = self._balanced_counts(int(length))
        for group in rng.choice(tied, size=extra, replace=False):
            counts[group] += 1
        chosen = []
        for group, count in enumerate(counts):
            picks = rng.choice(self._free[group], size=count - self._fixed_count[group], replace=False)
            chosen.extend(int(layer) for layer in picks)
        return tuple(chosen)

    def _balanced_counts(self, length: int) -> Tuple[List[int], List[int], int]:
        """Layers per pipeline stage for ``pipeline-balanced``, as even as the fixed layers allow.

        Water-filling: raise the least-loaded stages one layer at a time. Returns the
        deterministic counts, the stages that tie for the last layers and how many of
        them get one more (chosen at random, so every tied stage is equally likely).
        """
        counts = list(self._fixed_count)
        remaining = length - sum(counts)
        while remaining:
            open_groups = [g for g, group in enumerate(self.groups) if counts[g] < len(group)]
            level = min(counts[g] for g in open_groups)
            tied = [g for g in open_groups if counts[g] == level]
            if len(tied) > remaining:
                return counts, tied, remaining
            for g in tied:
                counts[g] += 1
            remaining -= len(tied)
        return counts, [], 0

    def _keep_probabilities(self, stage: int) -> Dict[int, float]:
        keep = {layer: 1.0 for layer in self.schedule.fixed_layers}
        if self.schedule.sampling != "pipeline-balanced":
            p = self.schedule.keep_probability(stage)
            keep.update({layer: p for layer in self._all_free})
            return keep
        counts, tied, extra = self._balanced_counts(int(self.schedule.stages[stage].length))
        for group, free in enumerate(self._free):
            expected = counts[group] + (extra / len(tied) if group in tied else 0.0)
            keep.update({layer: (expected - self._fixed_count[group]) / len(free) for layer in free})
        return keep

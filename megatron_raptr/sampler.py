"""The path of a training step: which layers run at iteration t.

The path is a pure function of (seed, iteration, schedule, pipeline layout), so
every rank computes the same path with no communication. It never touches the
global RNGs, which Megatron seeds differently on every pipeline stage.
"""

import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_raptr.layout import PipelineLayout
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

    ``layout`` is the pipeline's model chunks (``pipeline_layout(config)``; or, for each pipeline
    stage, how many consecutive layers it holds); it matters only for ``pipeline-balanced``
    sampling. Default: a single stage with all layers.
    """

    def __init__(self, schedule: RaptrSchedule, seed: int,
                 layout: Optional[Union[PipelineLayout, Sequence[int]]] = None):
        layout = PipelineLayout.of(layout if layout is not None else (schedule.num_layers,))
        if layout.num_layers != schedule.num_layers or min(layout.sizes) < 1:
            raise ValueError(f"pipeline layout {layout.sizes} does not split {schedule.num_layers} layers")
        self.schedule = schedule
        self.seed = seed
        self.groups = tuple(tuple(layout.chunk_layers(chunk)) for chunk in range(len(layout.sizes)))
        self._ranks = layout.ranks
        fixed = set(schedule.fixed_layers)
        self._free = [[layer for layer in group if layer not in fixed] for group in self.groups]
        self._fixed_count = [len(group) - len(free) for group, free in zip(self.groups, self._free)]
        self._all_free = [layer for free in self._free for layer in free]
        if schedule.sampling == "pipeline-balanced":
            self._balance = [self._balanced(int(stage.length)) for stage in schedule.stages]
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
        balance = self._balance[stage]
        extras = dict(balance.rank_extras)
        for rank in rng.choice(balance.tied_ranks, size=balance.extra, replace=False):
            extras[rank] += 1
        counts = list(balance.counts)
        for rank, count in extras.items():  # a rank's extra layers go to its tied chunks
            tied = balance.tied[rank]
            # No draw where there is no choice: without virtual stages (one chunk per rank) the
            # random stream, and so every path, is the one of one level of balancing.
            for group in tied[:count] if count in (0, len(tied)) else rng.choice(tied, size=count, replace=False):
                counts[group] += 1
        chosen = []
        for group, count in enumerate(counts):
            picks = rng.choice(self._free[group], size=count - self._fixed_count[group], replace=False)
            chosen.extend(int(layer) for layer in picks)
        return tuple(chosen)

    def _balanced(self, length: int) -> "_Balance":
        """Layers per model chunk for ``pipeline-balanced``, as even as the fixed layers allow over the
        chunks (the virtual stages), and then, for the last layers that several chunks tie for, over the
        pipeline ranks (water-filling both times: raise the least-loaded one layer at a time)."""
        counts, tied, extra = _water_fill(self._fixed_count, [len(group) for group in self.groups],
                                          length - sum(self._fixed_count))
        tied_by_rank: Dict[int, List[int]] = {}
        for group in tied:
            tied_by_rank.setdefault(self._ranks[group], []).append(group)
        ranks = list(tied_by_rank)
        loads = [sum(count for group, count in enumerate(counts) if self._ranks[group] == rank) for rank in ranks]
        filled, tied_ranks, rank_extra = _water_fill(loads, [load + len(tied_by_rank[rank])
                                                             for rank, load in zip(ranks, loads)], extra)
        return _Balance(counts, tied_by_rank, {rank: new - load for rank, new, load in zip(ranks, filled, loads)},
                        [ranks[i] for i in tied_ranks], rank_extra)

    def _keep_probabilities(self, stage: int) -> Dict[int, float]:
        keep = {layer: 1.0 for layer in self.schedule.fixed_layers}
        if self.schedule.sampling != "pipeline-balanced":
            p = self.schedule.keep_probability(stage)
            keep.update({layer: p for layer in self._all_free})
            return keep
        balance = self._balance[stage]
        expected = [float(count) for count in balance.counts]
        for rank, tied in balance.tied.items():
            extras = balance.rank_extras[rank] + (balance.extra / len(balance.tied_ranks)
                                                  if rank in balance.tied_ranks else 0.0)
            for group in tied:
                expected[group] += extras / len(tied)
        for group, free in enumerate(self._free):
            keep.update({layer: (expected[group] - self._fixed_count[group]) / len(free) for layer in free})
        return keep


@dataclass(frozen=True)
class _Balance:
    """A path length's split over the model chunks under ``pipeline-balanced``: each chunk's
    deterministic count, then the chunks that tie for the last layers (by rank), each such rank's
    deterministic share of those, and the ranks that tie for the very last ones, ``extra`` of them
    getting one more (chosen at random: every tied rank, then every tied chunk of a rank, equally likely)."""

    counts: List[int]
    tied: Dict[int, List[int]]
    rank_extras: Dict[int, int]
    tied_ranks: List[int]
    extra: int


def _water_fill(counts: List[int], caps: Sequence[int], remaining: int) -> Tuple[List[int], List[int], int]:
    """Raises the lowest of ``counts`` (each up to its cap) one at a time until ``remaining`` are added.

    Returns the deterministic counts, the indices that tie for the last units and how many of
    them get one more (the caller chooses which).
    """
    counts = list(counts)
    while remaining:
        open_ = [i for i, cap in enumerate(caps) if counts[i] < cap]
        level = min(counts[i] for i in open_)
        tied = [i for i in open_ if counts[i] == level]
        if len(tied) > remaining:
            return counts, tied, remaining
        for i in tied:
            counts[i] += 1
        remaining -= len(tied)
    return counts, [], 0

"""The training methods, each a way of producing the step's path on the same machinery.

The run's schedule decides the method: RaPTr (``RaptrSchedule``, the baseline being its
full-model schedule), gradual stacking (``StackingSchedule``) or progressive layer
dropping (``PLDSchedule``). Each has a sampler whose ``path(t)`` depends only on the
seed, t and the pipeline layout; stacking adds the growth at its stage boundaries.
"""

from typing import List, Sequence, Union

from megatron.core.optimizer import MegatronOptimizer

from megatron_raptr.growth import StackingGrowth
from megatron_raptr.hooks import StageHook
from megatron_raptr.layer import ModelChunks
from megatron_raptr.pld import PLDSampler, PLDSchedule
from megatron_raptr.sampler import PathSampler
from megatron_raptr.schedule import RaptrSchedule
from megatron_raptr.stacking import StackingSampler, StackingSchedule

Schedule = Union[RaptrSchedule, StackingSchedule, PLDSchedule]


def build_sampler(schedule: Schedule, seed: int, layout: Sequence[int]):
    """The object whose ``path(t)`` gives the step's path under ``schedule``."""
    if isinstance(schedule, StackingSchedule):
        return StackingSampler(schedule)
    if isinstance(schedule, PLDSchedule):
        return PLDSampler(schedule, seed)
    return PathSampler(schedule, seed, layout)


def method_hooks(schedule: Schedule, model: ModelChunks, optimizer: MegatronOptimizer,
                 layout: Sequence[int]) -> List[StageHook]:
    """Stage hooks the method itself needs, to run before any other."""
    return [StackingGrowth(model, optimizer, layout)] if isinstance(schedule, StackingSchedule) else []

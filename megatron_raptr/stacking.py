"""Gradual stacking (Reddi et al. 2023) as paths: grow the model stage by stage.

During a stage only the first LENGTH layers exist: every step trains the
deterministic prefix path 1..LENGTH, unscaled, and evaluation runs the same
prefix (the path gates evaluation too). At a stage boundary the new layers are
initialised by copying existing ones (megatron_raptr/growth.py does the copying):

- ``top`` (Reddi et al.): the new layers are copies of the current top layers, in
  order; 6 -> 9 copies layers 4-6 into 7-9.
- ``middle`` (MIDAS, Saunshi et al. 2024): the middle block of as many layers as
  are added is duplicated in place; the layers above it move up.

Layers beyond LENGTH are allocated from the start (the model has --num-layers
layers) and are off the path until they are born, when the copy overwrites them.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

from megatron_raptr.sampler import Path
from megatron_raptr.schedule import StagedSchedule, parse_stages

COPY_MODES = ("top", "middle")
OPTIMIZER_STATES = ("fresh", "copy")
FLAG = "--stacking-schedule"


@dataclass(frozen=True)
class StackingSchedule(StagedSchedule):
    """Stages whose LENGTH is the number of layers that exist (a prefix of the model)."""

    copy: str = "top"
    optimizer_state: str = "fresh"  # the new layers' Adam moments: zero, or the source layers'
    FLAG = FLAG

    def __post_init__(self):
        if self.copy not in COPY_MODES:
            raise ValueError(f"--stacking-copy must be one of {COPY_MODES}, got {self.copy!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"--stacking-optimizer-state must be one of {OPTIMIZER_STATES}, "
                             f"got {self.optimizer_state!r}")
        super().__post_init__()
        for stage in self.stages:
            if stage.length != int(stage.length) or not 1 <= stage.length <= self.num_layers:
                raise ValueError(f"{FLAG}: LENGTH must be a whole number of layers in 1..{self.num_layers} "
                                 f"(--num-layers), got {stage.length:g}")
        for before, after in zip(self.stages, self.stages[1:]):
            old, new = int(before.length), int(after.length)
            if new <= old:
                raise ValueError(f"{FLAG}: the model must grow at every boundary, but {new}@{after.start} "
                                 f"follows {old}@{before.start}")
            if new - old > old:
                raise ValueError(f"{FLAG}: growing from {old} to {new} layers at {after.start} copies "
                                 f"{new - old} layers, but only {old} exist (grow by at most doubling)")

    @classmethod
    def parse(cls, text: str, num_layers: int, train_iters: int, copy: str = "top",
              optimizer_state: str = "fresh") -> "StackingSchedule":
        return cls(parse_stages(text, train_iters, FLAG), num_layers, copy, optimizer_state)

    def layers(self, stage: int) -> int:
        """How many layers exist during ``stage``."""
        return int(self.stages[stage].length)

    def growth(self, stage: int) -> Dict[int, int]:
        """Entering ``stage``: target layer -> the layer whose weights it takes (1-based,
        numbered as before the growth). Layers that keep their weights are left out."""
        first, added, new = self._copied_block(stage)
        if self.copy == "top":
            return {first + added + i: first + i for i in range(added)}
        # The block is followed by its copy; the layers above it move up.
        return {target: target - added for target in range(first + added, new + 1)}

    def new_layers(self, stage: int) -> Tuple[int, ...]:
        """The layers born entering ``stage``: the copies (moved layers are not new)."""
        first, added, _ = self._copied_block(stage)
        return tuple(range(first + added, first + 2 * added))

    def _copied_block(self, stage: int) -> Tuple[int, int, int]:
        """First layer and size of the block copied entering ``stage``, and the new depth."""
        old, new = self.layers(stage - 1), self.layers(stage)
        added = new - old
        first = old - added + 1 if self.copy == "top" else (old - added) // 2 + 1
        return first, added, new

    def stage_summary(self, stage: int) -> str:
        return f"layers 1-{self.layers(stage)} of {self.num_layers}"

    def describe(self, train_iters: int) -> str:
        lines = [f"Gradual stacking: {self.num_layers} layers, new layers copy the {self.copy} "
                 f"{'layers' if self.copy == 'top' else 'block'}, {self.optimizer_state} optimizer state"]
        for index, (stage, steps) in enumerate(zip(self.stages, self.stage_iterations(train_iters))):
            grown = "" if index == 0 else ", " + ", ".join(
                f"{target}<-{source}" for target, source in sorted(self.growth(index).items()))
            lines.append(f"  stage {index}: iterations {stage.start}-{stage.start + steps - 1} ({steps}), "
                         f"layers 1-{self.layers(index)}{grown}")
        lines.append(f"  expected layer FLOPs vs full training: {self.expected_layer_fraction(train_iters):.3f}")
        return "\n".join(lines)


class StackingSampler:
    """The prefix of the layers that exist, unscaled, in training and in evaluation."""

    def __init__(self, schedule: StackingSchedule):
        self.schedule = schedule

    def path(self, iteration: int) -> Path:
        stage = self.schedule.stage_index(iteration)
        active = tuple(range(1, self.schedule.layers(stage) + 1))
        return Path(iteration, stage, active, {layer: 1.0 for layer in active}, gates_eval=True)

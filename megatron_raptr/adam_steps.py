"""Adam's step count per layer: a layer updated n times is bias-corrected by 1 - beta^n.

Megatron's optimizers keep one step count t for every parameter (Apex and Transformer Engine
FusedAdam per parameter group; torch's Adam per parameter, kept equal here because Megatron's
checkpoints hold one). A layer that missed steps has moments gathered over n < t updates; dividing
them by 1 - beta^t instead of 1 - beta^n made a layer joining after 1500 steps (beta2 0.999) move
2.76 x LR in its first update, where a fresh Adam step is 1.0 x LR. The optimizer step
(megatron_raptr/optimizer_step.py) therefore runs each parameter with its own count n = t - missed.

What a layer misses is a function of the path history, itself a pure function of (seed, t), so a
resumed run can replay it under any layout (Megatron-LM's loop does; pretrain_raptr.py's checkpoints
also keep the counts, so that a run continued under another method keeps them):

- with --raptr-skip-optimizer-step: the steps it was off the path (it took no update in them);
- without: the steps before it was first on the path (its moments are zero until then; after, a
  skipped step's zero gradient decays them as any observation does, and counts);
- gradual stacking: a grown layer takes its source's count when it takes its source's moments,
  and starts at 0 with fresh ones (--stacking-optimizer-state).
"""

from typing import Dict, Optional

from megatron_raptr.sampler import Path
from megatron_raptr.stacking import StackingSchedule


class MissedSteps:
    """Per layer (1-based global number), how many of the steps so far it took no update in.

    ``through(path)`` counts every step up to and including ``path``'s; steps whose path was not
    passed in (a resumed run's history) are replayed from ``sampler``.
    """

    def __init__(self, num_layers: int, skipped_take_no_step: bool, sampler=None):
        self.num_layers, self.skipped_take_no_step, self.sampler = num_layers, skipped_take_no_step, sampler
        self._reset()

    def _reset(self) -> None:
        self.missed: Dict[int, int] = dict.fromkeys(range(1, self.num_layers + 1), 0)
        self.trained = set()
        self.idle = dict(self.missed)  # steps off the path in a row, up to the last one counted
        self.skipped_before = dict(self.missed)  # a layer on the last path: how many steps in a row it missed before it
        self.iteration = 0  # steps counted

    def state_dict(self) -> dict:
        """What a checkpoint keeps: a run continued under another method (a RaPTr checkpoint finished as
        the full model) cannot replay the history from its own paths."""
        return dict(iteration=self.iteration, missed=dict(self.missed), idle=dict(self.idle),
                    trained=sorted(self.trained))

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.trained = state["iteration"], set(state["trained"])
        self.missed, self.idle = dict(state["missed"]), dict(state["idle"])
        self.skipped_before = dict.fromkeys(self.missed, 0)

    def through(self, path: Path) -> Dict[int, int]:
        if path.iteration + 1 < self.iteration:  # a new run in this process went back: count afresh
            self._reset()
        while self.iteration < path.iteration:
            if self.sampler is None:
                raise ValueError(f"the paths of steps {self.iteration}-{path.iteration - 1} are unknown: "
                                 "pass the sampler to replay them")
            self._count(self.sampler.path(self.iteration))
        if self.iteration == path.iteration:
            self._count(path)
        return self.missed

    def _count(self, path: Path) -> None:
        self._grow(path)
        active = set(path.active)
        self.trained |= active
        for layer in self.missed:
            on_path = layer in active
            self.skipped_before[layer] = self.idle[layer] if on_path else 0
            self.idle[layer] = 0 if on_path else self.idle[layer] + 1
            if not on_path and (self.skipped_take_no_step or layer not in self.trained):
                self.missed[layer] += 1
        self.iteration += 1

    def _grow(self, path: Path) -> None:
        schedule: Optional[StackingSchedule] = getattr(self.sampler, "schedule", None)
        if not isinstance(schedule, StackingSchedule) or path.stage == 0 \
                or path.iteration != schedule.stages[path.stage].start:
            return
        fresh = schedule.new_layers(path.stage) if schedule.optimizer_state == "fresh" else ()
        before, idle = dict(self.missed), dict(self.idle)
        for target, source in schedule.growth(path.stage).items():
            self.missed[target] = path.iteration if target in fresh else before[source]
            self.idle[target] = idle[source]  # the copied weights are the source's

"""Stage-aware hooks: what happens when training crosses a RaPTr stage boundary.

The trainer calls ``on_stage_start`` whenever it enters a stage: at a boundary,
and for the stage in progress when a run starts or resumes. ``lr_scale`` multiplies
the learning rate Megatron's scheduler sets for the step. Hooks should derive what
they do from the iteration and the schedule alone, so a resumed run behaves
exactly like an uninterrupted one.

Default: nothing changes at a boundary; one LR schedule spans all stages, as in
the RaPTr paper.
"""

from typing import List

from megatron_raptr.schedule import RaptrSchedule


class StageHook:
    """Subclass and pass to ``train(..., hooks=[...])`` to add stage behaviour."""

    def on_stage_start(self, schedule: RaptrSchedule, stage: int, iteration: int) -> None:
        pass

    def lr_scale(self, schedule: RaptrSchedule, iteration: int) -> float:
        return 1.0


class StageLRRewarmup(StageHook):
    """Linear LR re-warmup over ``warmup_iters`` after every stage boundary (not stage 0)."""

    def __init__(self, warmup_iters: int):
        self.warmup_iters = warmup_iters

    def lr_scale(self, schedule: RaptrSchedule, iteration: int) -> float:
        stage = schedule.stage_index(iteration)
        if stage == 0:
            return 1.0
        return min(1.0, (iteration - schedule.stages[stage].start + 1) / self.warmup_iters)


def default_hooks(args) -> List[StageHook]:
    return [StageLRRewarmup(args.raptr_stage_warmup_iters)] if args.raptr_stage_warmup_iters else []

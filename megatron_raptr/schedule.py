"""Stage schedules: which expected path length trains from which iteration.

A schedule is written as ``LENGTH@START`` stages separated by commas, e.g.
``6@0,8@0.25,10@0.5,12@0.75``. LENGTH is the expected number of layers on the
path; START is an iteration (an integer) or a fraction of the training
iterations (a number with a decimal point). ``auto:FRACTION`` builds RaPTr's
stages for a budget (``growing_stages``). RaPTr's stages (``--raptr-schedule``)
and gradual stacking's (``--stacking-schedule``, megatron_raptr/stacking.py) share
this form and ``StagedSchedule``.
"""

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

SAMPLING_MODES = ("bernoulli", "fixed-size", "pipeline-balanced")
SCALING_RULES = ("inverse-keep", "inverse-sqrt-keep", "none")
FLAG = "--raptr-schedule"


@dataclass(frozen=True)
class Stage:
    start: int  # first iteration of the stage (0-based)
    length: float  # expected number of layers on the path


@dataclass(frozen=True)
class StagedSchedule:
    """Stages of a run over ``num_layers`` layers; ``FLAG`` names the option they came from."""

    stages: Tuple[Stage, ...]
    num_layers: int
    FLAG = FLAG

    def __post_init__(self):
        if not self.stages:
            raise ValueError(f"{self.FLAG} has no stages")
        if self.stages[0].start != 0:
            raise ValueError(f"{self.FLAG}: the first stage must start at iteration 0, not {self.stages[0].start}")
        for before, after in zip(self.stages, self.stages[1:]):
            if after.start <= before.start:
                raise ValueError(
                    f"{self.FLAG}: stage starts must increase, but {after.length:g}@{after.start} "
                    f"does not start after {before.length:g}@{before.start}"
                )

    def stage_index(self, iteration: int) -> int:
        return bisect.bisect_right([stage.start for stage in self.stages], iteration) - 1

    def stage_iterations(self, train_iters: int) -> Tuple[int, ...]:
        """How many of ``train_iters`` iterations each stage trains."""
        ends = [stage.start for stage in self.stages[1:]] + [train_iters]
        return tuple(max(0, min(end, train_iters) - min(stage.start, train_iters))
                     for stage, end in zip(self.stages, ends))

    def expected_layer_fraction(self, train_iters: int) -> float:
        """Expected transformer-layer FLOPs of the run relative to training the full model."""
        steps = self.stage_iterations(train_iters)
        mean_length = sum(n * stage.length for n, stage in zip(steps, self.stages)) / sum(steps)
        return mean_length / self.num_layers

    def stage_summary(self, stage: int) -> str:
        """What trains during ``stage``, for the log line on entering it."""
        return f"path length {self.stages[stage].length:g} of {self.num_layers}"


@dataclass(frozen=True)
class RaptrSchedule(StagedSchedule):
    """Stages of a run plus the rules every stage shares.

    ``fixed_layers`` are 1-based global layer numbers that are always on the path.
    ``scaling`` is what multiplies a kept layer's residual update during training:
    ``inverse-keep`` (1 / the layer's keep probability, as in stochastic depth, so the
    full model evaluated at any step sees the expected update training saw),
    ``inverse-sqrt-keep`` (1 / its square root: the residual stream's norm grows about
    as the square root of the number of roughly independent updates added to it, so
    this keeps a path's stream at the full model's scale rather than its mean) or
    ``none``. Fixed layers and the full-model stage are never scaled.
    """

    fixed_layers: Tuple[int, ...]
    sampling: str = "bernoulli"
    scaling: str = "none"  # chosen by measurement: README, "RaPTr's defaults"

    def __post_init__(self):
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"--raptr-sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.scaling not in SCALING_RULES:
            raise ValueError(f"--raptr-scaling must be one of {SCALING_RULES}, got {self.scaling!r}")
        bad = [layer for layer in self.fixed_layers if not 1 <= layer <= self.num_layers]
        if bad or len(set(self.fixed_layers)) != len(self.fixed_layers):
            raise ValueError(
                f"--raptr-fixed-layers must be distinct layer numbers in 1..{self.num_layers} "
                f"(1-based), got {list(self.fixed_layers)}"
            )
        super().__post_init__()
        for stage in self.stages:
            if not len(self.fixed_layers) <= stage.length <= self.num_layers:
                raise ValueError(
                    f"{FLAG}: path length {stage.length:g} must lie between the number of fixed "
                    f"layers ({len(self.fixed_layers)}) and --num-layers ({self.num_layers})"
                )
            if self.sampling != "bernoulli" and stage.length != int(stage.length):
                raise ValueError(
                    f"{FLAG}: --raptr-sampling {self.sampling} needs whole path lengths, got {stage.length:g}"
                )

    @classmethod
    def parse(
        cls,
        text: str,
        num_layers: int,
        train_iters: int,
        fixed_layers: Optional[Sequence[int]] = None,
        sampling: str = "bernoulli",
        scaling: str = "none",
    ) -> "RaptrSchedule":
        """Parses ``LENGTH@START,...`` or ``auto:FRACTION``; ``fixed_layers`` defaults to the first
        and last layer."""
        if fixed_layers is None:
            fixed_layers = sorted({1, num_layers})
        if text.startswith("auto:"):
            text = auto_stages(text, num_layers, len(fixed_layers))
        stages = parse_stages(text, train_iters, FLAG)
        return cls(tuple(stages), num_layers, tuple(fixed_layers), sampling, scaling)

    @classmethod
    def full_model(cls, num_layers: int) -> "RaptrSchedule":
        """The baseline: every layer on the path at every step."""
        return cls((Stage(0, num_layers),), num_layers, tuple(range(1, num_layers + 1)), scaling="none")

    def scale(self, keep: float) -> float:
        """The residual-update multiplier of a kept layer whose keep probability is ``keep``."""
        if self.scaling == "inverse-keep":
            return 1.0 / keep
        if self.scaling == "inverse-sqrt-keep":
            return keep ** -0.5
        return 1.0

    def keep_probability(self, stage_index: int) -> float:
        """Probability that a non-fixed layer is on the path (uniform sampling modes)."""
        free = self.num_layers - len(self.fixed_layers)
        if free == 0:
            return 1.0
        return (self.stages[stage_index].length - len(self.fixed_layers)) / free

    def describe(self, train_iters: int) -> str:
        lines = [
            f"RaPTr schedule: {self.num_layers} layers, fixed {list(self.fixed_layers)}, "
            f"sampling {self.sampling}, scaling {self.scaling}"
        ]
        for index, (stage, steps) in enumerate(zip(self.stages, self.stage_iterations(train_iters))):
            lines.append(
                f"  stage {index}: iterations {stage.start}-{stage.start + steps - 1} ({steps}), "
                f"path length {stage.length:g}, keep probability {self.keep_probability(index):.3f}"
            )
        lines.append(f"  expected layer FLOPs vs full training: {self.expected_layer_fraction(train_iters):.3f}")
        return "\n".join(lines)


AUTO_STAGES = 4  # the shape that --raptr-schedule auto:FRACTION builds (README: "RaPTr's defaults")


def auto_stages(text: str, num_layers: int, fixed: int) -> str:
    """``auto:FRACTION`` as ``growing_stages`` from the fixed layers alone (at least one layer):
    of the shapes measured for the defaults, the one that won at the longer budget."""
    try:
        fraction = float(text[len("auto:"):])
    except ValueError:
        raise ValueError(f"{FLAG} auto:FRACTION needs a number, got {text!r}") from None
    return growing_stages(num_layers, fraction, AUTO_STAGES, max(1, fixed))


def growing_stages(num_layers: int, fraction: float, num_stages: int, first: int) -> str:
    """Stages ``LENGTH@START,...`` that grow the path linearly from ``first`` layers to all of them
    in ``num_stages`` stages, spending ``fraction`` of full training's transformer-layer FLOPs.

    The growing stages last equally long and the full model trains for the rest, so a stage
    lasts ``(1 - fraction) L / sum over growing stages of (L - length)``; a first length of
    ``(2 fraction - 1) L`` makes all stages equal (the paper's 6-8-10-12 is 0.75 of 12 layers).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{FLAG} auto:FRACTION needs a fraction in (0, 1), got {fraction:g}")
    if num_stages < 2 or not 1 <= first < num_layers:
        raise ValueError(f"{FLAG}: {num_stages} stages from {first} of {num_layers} layers do not grow")
    # Rounded to whole layers (fixed-size sampling needs them); a length rounding repeats is one stage.
    lengths = sorted({round(first + (num_layers - first) * k / (num_stages - 1)) for k in range(num_stages)})
    return equal_stages(num_layers, fraction, lengths[:-1],
                        f"growing from {first} of {num_layers} layers in {num_stages} stages")


def equal_stages(num_layers: int, fraction: float, lengths: Sequence[int], shape: str, flag: str = FLAG) -> str:
    """Stages ``LENGTH@START,...``: the growing ``lengths``, equally long, then the full model for the
    rest, spending ``fraction`` of full training's transformer-layer FLOPs; ``shape`` names them in errors."""
    saved = sum(num_layers - length for length in lengths)
    duration = (1.0 - fraction) * num_layers / saved
    if duration * len(lengths) >= 1.0:
        lowest = 1.0 - saved / (len(lengths) * num_layers)
        raise ValueError(f"{flag}: {shape} spends at least {lowest:.3f} of full training's layer FLOPs, "
                         f"more than {fraction:g}")
    return ",".join(f"{length}@{k * duration:.4f}" if k else f"{length}@0"
                    for k, length in enumerate([*lengths, num_layers]))


def parse_stages(text: str, train_iters: int, flag: str) -> Tuple[Stage, ...]:
    """``LENGTH@START,...`` as stages; errors name ``flag``."""
    stages = []
    for item in text.split(","):
        length_text, at, start_text = item.strip().partition("@")
        if not at:
            raise ValueError(f"{flag}: stage {item.strip()!r} is not of the form LENGTH@START")
        try:
            length = float(length_text)
            start = _parse_start(start_text.strip(), train_iters)
        except ValueError as error:
            raise ValueError(f"{flag}: stage {item.strip()!r}: {error}") from None
        if start >= train_iters:
            raise ValueError(f"{flag}: stage {item.strip()!r} starts at or after --train-iters ({train_iters})")
        stages.append(Stage(start=start, length=length))
    return tuple(stages)


def _parse_start(text: str, train_iters: int) -> int:
    if "." in text:
        fraction = float(text)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"a fractional START must lie in [0, 1), got {text}")
        return round(fraction * train_iters)
    start = int(text)
    if start < 0:
        raise ValueError(f"START must not be negative, got {start}")
    return start

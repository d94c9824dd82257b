"""Progressive layer dropping (Zhang and He 2020) as paths: drop more layers as training goes on.

At iteration t the keep level is theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar,
falling from 1 towards theta_bar, and layer l of L is kept with probability
1 - (l / L) (1 - theta(t)): deeper layers are dropped more often. A kept layer's
residual update is scaled by 1 / its keep probability; evaluation runs the full
model unscaled. Paths come from (seed, t) alone, like RaPTr's, so every rank
draws the same path without communication.
"""

from dataclasses import dataclass
from typing import Dict

import numpy as np

from megatron_raptr.sampler import Path
from megatron_raptr.schedule import Stage

# Separates PLD's stream from RaPTr's and any other user of (seed, iteration).
_STREAM = 0x504C44  # "PLD"


@dataclass(frozen=True)
class PLDSchedule:
    theta_bar: float  # --pld-theta: the keep level theta(t) decays to
    gamma: float  # --pld-gamma: decay rate per iteration
    num_layers: int

    def __post_init__(self):
        if not 0.0 < self.theta_bar <= 1.0:
            raise ValueError(f"--pld-theta must lie in (0, 1], got {self.theta_bar:g}")
        if not self.gamma > 0.0:
            raise ValueError(f"--pld-gamma must be positive, got {self.gamma:g}")

    # PLD has no stages: one stage spanning the run lets stage hooks and the trainer's
    # stage bookkeeping apply unchanged. Its LENGTH is the full model, as at t = 0.
    @property
    def stages(self):
        return (Stage(0, float(self.num_layers)),)

    def stage_index(self, iteration: int) -> int:
        return 0

    def theta(self, iteration: int) -> float:
        return (1.0 - self.theta_bar) * np.exp(-self.gamma * iteration) + self.theta_bar

    def keep_probabilities(self, iteration: int) -> Dict[int, float]:
        """Probability that each layer (1-based) is on the path at ``iteration``."""
        drop = 1.0 - self.theta(iteration)
        return {layer: 1.0 - layer / self.num_layers * drop for layer in range(1, self.num_layers + 1)}

    def expected_layer_fraction(self, train_iters: int) -> float:
        """Expected transformer-layer FLOPs of the run relative to training the full model."""
        # The sum over layers of 1 - (l / L)(1 - theta) is L - (L + 1) / 2 (1 - theta).
        theta = self.theta(np.arange(train_iters))
        mean_length = self.num_layers - (self.num_layers + 1) / 2 * (1.0 - theta).mean()
        return float(mean_length / self.num_layers)

    def stage_summary(self, stage: int) -> str:
        return (f"layer l of {self.num_layers} kept with probability 1 - (l / {self.num_layers})(1 - theta(t)), "
                f"theta(t) = {1 - self.theta_bar:g} exp(-{self.gamma:g} t) + {self.theta_bar:g}")

    def describe(self, train_iters: int) -> str:
        lines = [f"Progressive layer dropping: {self.num_layers} layers, theta_bar {self.theta_bar:g}, "
                 f"gamma {self.gamma:g}"]
        for t in sorted({0, train_iters // 4, train_iters // 2, 3 * train_iters // 4, train_iters - 1}):
            keep = self.keep_probabilities(t)
            lines.append(f"  iteration {t}: theta {self.theta(t):.3f}, keep layer 1 {keep[1]:.3f}, "
                         f"layer {self.num_layers} {keep[self.num_layers]:.3f}, "
                         f"expected path length {sum(keep.values()):.2f}")
        lines.append(f"  expected layer FLOPs vs full training: {self.expected_layer_fraction(train_iters):.3f}")
        return "\n".join(lines)


class PLDSampler:
    """Each layer on the path independently with its keep probability at t; scale 1 / keep."""

    def __init__(self, schedule: PLDSchedule, seed: int):
        self.schedule = schedule
        self.seed = seed

    def path(self, iteration: int) -> Path:
        keep = self.schedule.keep_probabilities(iteration)
        draws = np.random.default_rng((self.seed, iteration, _STREAM)).random(len(keep))
        active = tuple(layer for layer, u in zip(keep, draws) if u < keep[layer])
        return Path(iteration, 0, active, {layer: 1.0 / keep[layer] for layer in active})

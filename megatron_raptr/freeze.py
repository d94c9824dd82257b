"""--raptr-freeze-skipped: a skipped layer's weights and optimizer state stay exactly as they were.

By default a skipped layer takes part in the optimizer step with a zero gradient
(Adam's momentum and weight decay still move it). Freezing instead withholds the
layer from the step: its parameters, Adam moments and step count are untouched,
as if the layer did not exist that step, and the optimizer does no work for it.

Works through torch's optimizer step pre-hook, after Megatron has copied the
gradients to the optimizer's (possibly sharded, fp32) main parameters and clipped
them: the main parameters of skipped layers lose their gradient, and torch's
optimizers skip parameters without one.
"""

from typing import Dict, Iterable

import torch
from megatron.core.optimizer import MegatronOptimizer

# (model-parameter groups, main-parameter groups) of Megatron's optimizers that keep main copies.
_MAIN_COPY_GROUPS = (
    ("float16_groups", "fp32_from_float16_groups"),  # Float16OptimizerWithFloat16Params
    ("fp32_from_fp32_groups", "fp32_from_fp32_groups"),
    ("model_float16_groups", "shard_fp32_from_float16_groups"),  # DistributedOptimizer
    ("model_fp32_groups", "shard_fp32_groups"),
)


def _main_parameters(optimizer: MegatronOptimizer) -> Dict[torch.nn.Parameter, torch.Tensor]:
    """Model parameter -> the tensor the inner torch optimizer updates for it."""
    pairs = {}
    for model_attr, main_attr in _MAIN_COPY_GROUPS:
        for model_group, main_group in zip(getattr(optimizer, model_attr, ()), getattr(optimizer, main_attr, ())):
            pairs.update(zip(model_group, main_group))
    if not pairs:  # FP32Optimizer updates the model parameters themselves
        pairs = {p: p for group in optimizer.optimizer.param_groups for p in group["params"]}
    return pairs


class SkippedLayerFreezer:
    def __init__(self, optimizer: MegatronOptimizer):
        self._main = {}
        self._skipped = []
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            self._main.update(_main_parameters(inner))
            inner.optimizer.register_step_pre_hook(self._withhold_skipped)

    def set_skipped_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """This step's off-path parameters (those without a shard on this rank are ignored)."""
        self._skipped = [self._main[p] for p in params if p in self._main]

    def _withhold_skipped(self, optimizer, args, kwargs):
        for main in self._skipped:
            main.grad = None

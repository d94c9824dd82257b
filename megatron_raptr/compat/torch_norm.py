"""Megatron's torch-norm fallback (no Transformer Engine, no Apex) with sequence parallelism.

Megatron-Core's WrappedTorchNorm refuses sequence parallelism only because it does not
mark its parameters: under sequence parallelism each tensor-parallel rank sees part of
the sequence, so norm gradients must be summed across the TP group, which
finalize_model_grads does for parameters marked ``sequence_parallel``.
"""

import torch
from megatron.core.transformer import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelTorchNorm:
    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization not in _NORMS:
            raise ValueError(f"--normalization {config.normalization} has no torch fallback")
        norm = _NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

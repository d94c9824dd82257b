"""How Megatron splits the layers over pipeline stages, seen identically from every rank."""

from typing import Tuple

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


def pipeline_layout(config: TransformerConfig) -> Tuple[int, ...]:
    """Number of consecutive layers each pipeline stage builds, first stage first."""
    stages = config.pipeline_model_parallel_size
    if stages == 1:
        return (config.num_layers,)
    if config.virtual_pipeline_model_parallel_size is not None or config.pipeline_model_parallel_layout:
        raise ValueError("RaPTr supports neither virtual pipeline stages nor a custom pipeline layout yet")
    offsets = [get_transformer_layer_offset(config, pp_rank=rank) for rank in range(stages)]
    return tuple(end - start for start, end in zip(offsets, offsets[1:] + [config.num_layers]))

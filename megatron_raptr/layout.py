"""How Megatron splits the layers over pipeline ranks and virtual stages, seen identically from every rank."""

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


@dataclass(frozen=True)
class PipelineLayout:
    """The model chunks in layer order: each a run of consecutive layers that one pipeline rank builds
    for one virtual stage. Without virtual stages there is one chunk per rank, in rank order; with V of
    them, Megatron interleaves: chunk v * PP + r is rank r's virtual stage v."""

    sizes: Tuple[int, ...]  # layers of each chunk
    ranks: Tuple[int, ...]  # the pipeline rank that holds each chunk
    vp_stages: Tuple[int, ...]  # its virtual stage on that rank

    @classmethod
    def of(cls, layout: Union["PipelineLayout", Sequence[int]]) -> "PipelineLayout":
        """A layout as given, or one chunk per pipeline rank of the given sizes."""
        if isinstance(layout, PipelineLayout):
            return layout
        return cls(tuple(layout), tuple(range(len(layout))), (0,) * len(layout))

    @classmethod
    def even(cls, num_layers: int, pipeline_ranks: int, virtual_stages: int = 1) -> "PipelineLayout":
        """Megatron's default split: every rank's every virtual stage holds as many layers."""
        chunks = pipeline_ranks * virtual_stages
        if num_layers % chunks:
            raise ValueError(f"{num_layers} layers do not split into {pipeline_ranks} x {virtual_stages} equal chunks")
        return cls((num_layers // chunks,) * chunks, tuple(range(pipeline_ranks)) * virtual_stages,
                   tuple(v for v in range(virtual_stages) for _ in range(pipeline_ranks)))

    @property
    def num_layers(self) -> int:
        return sum(self.sizes)

    def chunk_layers(self, chunk: int) -> range:
        """The 1-based global layer numbers of a chunk."""
        start = sum(self.sizes[:chunk])
        return range(start + 1, start + self.sizes[chunk] + 1)

    def rank_of(self, layer: int) -> int:
        """The pipeline rank that holds a 1-based global layer."""
        for chunk, rank in enumerate(self.ranks):
            if layer in self.chunk_layers(chunk):
                return rank
        raise ValueError(f"layer {layer} is not in the {self.num_layers} layers of this layout")


def pipeline_layout(config: TransformerConfig) -> PipelineLayout:
    """Where each layer of the model sits: its pipeline rank and virtual stage (Megatron's own split)."""
    stages = config.pipeline_model_parallel_size
    if stages == 1:
        return PipelineLayout.of((config.num_layers,))
    if config.pipeline_model_parallel_layout:
        raise ValueError("RaPTr does not support a custom pipeline layout (--pipeline-model-parallel-layout) yet")
    virtual = config.virtual_pipeline_model_parallel_size
    vp_stages = range(virtual) if virtual is not None else [None]
    chunks = sorted((get_transformer_layer_offset(config, vp_stage=v, pp_rank=r),
                     get_num_layers_to_build(config, vp_stage=v, pp_rank=r), r, v or 0)
                    for v in vp_stages for r in range(stages))
    offsets, sizes, ranks, virtual_stages = zip(*chunks)
    if any(start != sum(sizes[:i]) for i, start in enumerate(offsets)) or sum(sizes) != config.num_layers:
        raise ValueError(f"the pipeline chunks (offset, layers) {list(zip(offsets, sizes))} do not split the "
                         f"{config.num_layers} layers into runs of consecutive layers")
    return PipelineLayout(sizes, ranks, virtual_stages)

"""Megatron-Core integration: a transformer layer that is the identity off the path.

Use ``get_gpt_raptr_layer_spec()``, ``get_bert_raptr_layer_spec()``, ``get_gpt_raptr_block_spec(config)``
(or ``raptr_decoder_spec(spec, config)`` on any layer or decoder block spec whose layers are
TransformerLayers: MoE, MLA, heterogeneous, ...) when building the model, then apply each iteration's path
with a ``PathSetter``. An off-path layer returns its input: no forward, no
backward, no saved activations. In eval mode every layer runs, unscaled, unless
the path says it gates evaluation too (gradual stacking's prefix).
"""

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Union

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.bert import bert_layer_specs
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_raptr import megatron_internals as internals
from megatron_raptr.compat.torch_norm import SequenceParallelTorchNorm
from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.sampler import Path


class RaptrTransformerLayer(TransformerLayer):
    """A TransformerLayer gated by the step's path: y = x + z * s * u, u = layer(x) - x its update.

    A scale s != 1 is applied in the layer's residual adds (Megatron's bias-dropout-adds), where
    each sublayer's update exists on its own: ``layer(x) - x`` would be a difference of two rounded
    tensors, which in bf16 with |u| << |x| keeps few of u's bits, and s > 1 amplifies that loss.
    Each add runs Megatron's own kernel against a zero residual (the same dropout mask), gives the
    next sublayer x + u_attn as Megatron would, and the last one (the MLP's) returns
    x + s * (u_attn + u_mlp) computed in at least fp32 and rounded once.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raptr_active = True
        self.raptr_scale = 1.0
        self.raptr_gates_eval = False
        self.raptr_ends_stage = False  # its output is its pipeline stage's (set by PathSetter)
        self._scaled_forward = None  # during a scaled forward: the layer input, the fp32 sum of the updates
        for name in ("self_attn_bda", "cross_attn_bda", "mlp_bda"):
            bda = getattr(self, name)
            if not isinstance(bda, torch.nn.Module):  # IdentityFuncOp: no sublayer, no residual add
                setattr(self, name, functools.partial(self._residual_add, bda, name == "mlp_bda"))

    def forward(self, *args, **kwargs):
        if not self.training and not self.raptr_gates_eval:
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not self.raptr_active:
            if self.raptr_ends_stage and self.config.deallocate_pipeline_outputs:
                # Megatron's schedule frees a sent output's storage and refuses views
                # (deallocate_output_tensor). Handed on, the input would be the stage's received input
                # (all its layers skipped: freed with it) or, under activation recompute, a view of an
                # earlier output (the checkpoint returns its input as one). A copy is what gets freed.
                hidden_states = hidden_states.clone()
            return hidden_states, kwargs.get("context")
        if self.raptr_scale == 1.0:
            return super().forward(*args, **kwargs)
        if isinstance(self.mlp_bda, torch.nn.Module):
            raise ValueError(f"layer {self.layer_number}: RaPTr scale {self.raptr_scale} is applied in the "
                             f"MLP's bias-dropout-add (mlp_bda), which this layer's spec does not have")
        self._scaled_forward = {}
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._scaled_forward = None

    def _residual_add(self, megatron_bda, last, training, fused):
        """Megatron's bias-dropout-add (a ``bda(training, fused)`` factory), scaled in a scaled forward."""
        add = megatron_bda(training, fused)
        if self._scaled_forward is None:
            return add
        return functools.partial(self._scaled_add, add, last)

    def _scaled_add(self, add, last, x_with_bias, residual, prob):
        update = add(x_with_bias, residual.new_zeros(()), prob)  # the sublayer's update alone
        layer_input = self._scaled_forward.setdefault("input", residual)
        total = update.to(torch.promote_types(update.dtype, torch.float32)) + self._scaled_forward.get("update", 0.0)
        if not last:
            self._scaled_forward["update"] = total
            return residual.to(update.dtype) + update  # the next sublayer's input, as Megatron's add gives it
        return (layer_input.to(total.dtype) + self.raptr_scale * total).to(update.dtype)


def raptr_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """The same layer spec with RaptrTransformerLayer as its module."""
    if not _is_transformer_layer(spec):
        raise TypeError(f"RaPTr gates TransformerLayer specs, got a spec of {getattr(spec, 'module', spec)!r}")
    return dataclasses.replace(spec, module=RaptrTransformerLayer)


def _is_transformer_layer(spec) -> bool:
    module = getattr(spec, "module", None)
    return isinstance(module, type) and issubclass(module, TransformerLayer)


def _block_submodules(spec) -> Optional[TransformerBlockSubmodules]:
    """The submodules of a decoder block spec (bare, or a ModuleSpec of a TransformerBlock); None for
    a layer spec. These are the forms Megatron's TransformerBlock takes."""
    if isinstance(spec, ModuleSpec) and isinstance(spec.module, type) and issubclass(spec.module, TransformerBlock):
        spec = spec.submodules
    return spec if isinstance(spec, TransformerBlockSubmodules) else None


def check_gateable(spec, selected_by: str) -> None:
    """Raises ValueError naming `selected_by` (the flag that chose the spec) unless every layer of
    this layer or decoder block spec is a TransformerLayer, which RaPTr can gate (not, e.g., Mamba)."""
    block = _block_submodules(spec)
    for layer in block.layer_specs if block is not None else [spec]:
        if not _is_transformer_layer(layer):
            raise ValueError(f"{selected_by}: RaPTr gates TransformerLayer layers; this spec has "
                             f"{getattr(layer, 'module', layer)!r}, which it cannot skip")


def raptr_decoder_spec(spec, config: TransformerConfig, vp_stage: Optional[int] = None,
                       selected_by: str = "the layer spec"):
    """A GPT layer spec or decoder block spec, as Megatron-Core and Megatron-LM build them (MoE, MLA,
    qk-layernorm, heterogeneous, ...), with every TransformerLayer gated by RaPTr and the rest unchanged.

    Where Megatron falls back to torch norms (no Transformer Engine, no Apex) they are replaced by ones
    that also run under sequence parallelism (the same torch modules otherwise). A layer spec stays a
    layer spec (Megatron-LM edits its attention for --attention-backend local), except under sequence
    parallelism there: TransformerBlock would end it in its own torch norm, which refuses it.
    """
    check_gateable(spec, selected_by)
    block = _block_submodules(spec)
    if block is not None:
        gated = dataclasses.replace(block, layer_specs=[raptr_layer_spec(_sequence_parallel_norms(layer))
                                                        for layer in block.layer_specs],
                                    layer_norm=_sequence_parallel_norms(block.layer_norm))
        return gated if isinstance(spec, TransformerBlockSubmodules) else dataclasses.replace(spec, submodules=gated)
    layer = raptr_layer_spec(_sequence_parallel_norms(spec))
    # Undocumented Megatron-Core name: the final norm TransformerBlock gives a layer spec's block.
    if config.sequence_parallel and internals.layer_norm_impl.get() is WrappedTorchNorm:
        return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                          layer_norm=SequenceParallelTorchNorm)
    return layer


def _sequence_parallel_norms(spec):
    """`spec` with Megatron's torch-norm fallback replaced wherever it appears in it."""
    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_sequence_parallel_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):  # the submodules of a spec
        return dataclasses.replace(spec, **{field.name: _sequence_parallel_norms(getattr(spec, field.name))
                                            for field in dataclasses.fields(spec) if field.init})
    return spec


def get_gpt_raptr_layer_spec(use_transformer_engine: bool = None, normalization: str = "LayerNorm",
                             **kwargs) -> ModuleSpec:
    """Megatron's GPT layer spec (Transformer Engine when installed, else local) gated by RaPTr.

    Where the local spec falls back to torch norms (no Apex), they are replaced by ones
    that support sequence parallelism. Transformer Engine's norms follow the config.
    """
    if use_transformer_engine is None:
        use_transformer_engine = internals.gpt_specs_have_te.get()
    if use_transformer_engine:
        return raptr_layer_spec(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs))
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, **kwargs)
    return raptr_layer_spec(_sequence_parallel_norms(spec))


def get_bert_raptr_layer_spec(use_transformer_engine: bool = None) -> ModuleSpec:
    """Megatron's BERT layer spec (bidirectional, padding mask; Transformer Engine when installed,
    else local) gated by RaPTr. (Its torch-norm fallback needs no sequence-parallel variant: without
    Apex, Megatron's BERT head refuses sequence parallelism anyway.)"""
    if use_transformer_engine is None:
        use_transformer_engine = internals.bert_specs_have_te.get()
    if use_transformer_engine:
        return raptr_layer_spec(bert_layer_specs.get_bert_layer_with_transformer_engine_spec())
    return raptr_layer_spec(bert_layer_specs.bert_layer_local_spec)


def get_gpt_raptr_block_spec(config: TransformerConfig, use_transformer_engine: bool = None,
                             vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder block as Megatron-Core builds it from the config
    (get_gpt_decoder_block_spec: dense layers, or MoE ones per --num-experts and --moe-layer-freq,
    qk-layernorm, MLA), gated by RaPTr."""
    if use_transformer_engine is None:
        use_transformer_engine = internals.gpt_specs_have_te.get()
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine,
                                                       normalization=config.normalization, vp_stage=vp_stage)
    return raptr_decoder_spec(block, config, vp_stage)


ModelChunks = Union[torch.nn.Module, Sequence[torch.nn.Module]]


def raptr_layers(model: ModelChunks) -> List[RaptrTransformerLayer]:
    """This rank's RaPTr layers, in model order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, RaptrTransformerLayer)]


class PathSetter:
    """Applies a Path to a model's layers (and its DDP wrappers) once per iteration.

    Finds the layers and their parameters once, so the per-step cost is a loop over
    this rank's layers.
    """

    def __init__(self, model: ModelChunks):
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.layers: Dict[torch.nn.Module, List[RaptrTransformerLayer]] = {
            chunk: raptr_layers(chunk) for chunk in self.chunks
        }
        # Parameter lists are fixed after building; gathered once, not on every step.
        self.trainable = {layer: [p for p in layer.parameters() if p.requires_grad]
                          for layers in self.layers.values() for layer in layers}
        if not any(self.layers.values()):
            raise ValueError("the model has no RaptrTransformerLayer: build it with get_gpt_raptr_layer_spec()")
        for layers in self.layers.values():
            if layers:
                layers[-1].raptr_ends_stage = True
        for chunk in self.chunks:
            overlapped = isinstance(chunk, DistributedDataParallel) and chunk.ddp_config.overlap_grad_reduce
            if overlapped and not isinstance(chunk, RaptrDistributedDataParallel):
                raise TypeError(
                    "--overlap-grad-reduce with RaPTr needs RaptrDistributedDataParallel: Megatron's DDP "
                    "waits forever for gradients of skipped layers"
                )

    def __call__(self, path: Path) -> None:
        active = set(path.active)
        for chunk, layers in self.layers.items():
            skipped = []
            for layer in layers:
                layer.raptr_active = layer.layer_number in active
                layer.raptr_scale = path.scales.get(layer.layer_number, 1.0)
                layer.raptr_gates_eval = path.gates_eval
                if not layer.raptr_active:
                    skipped.extend(self.trainable[layer])
            if isinstance(chunk, RaptrDistributedDataParallel):
                chunk.path = path
                chunk.set_skipped_parameters(skipped)

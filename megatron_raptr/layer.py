"""Megatron-Core integration: a transformer layer that is the identity off the path.

Use ``get_gpt_raptr_layer_spec()``, ``get_bert_raptr_layer_spec()`` (or ``raptr_layer_spec(spec)`` on any
TransformerLayer spec) when building the model, then apply each iteration's path
with a ``PathSetter``. An off-path layer returns its input: no forward, no
backward, no saved activations. In eval mode every layer runs, unscaled, unless
the path says it gates evaluation too (gradual stacking's prefix).
"""

import dataclasses
import functools
from typing import Dict, List, Sequence, Union

import torch
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.bert import bert_layer_specs
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

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
    if not (isinstance(spec.module, type) and issubclass(spec.module, TransformerLayer)):
        raise TypeError(f"RaPTr gates TransformerLayer specs, got a spec of {spec.module!r}")
    return dataclasses.replace(spec, module=RaptrTransformerLayer)


def get_gpt_raptr_layer_spec(use_transformer_engine: bool = None, normalization: str = "LayerNorm",
                             **kwargs) -> ModuleSpec:
    """Megatron's GPT layer spec (Transformer Engine when installed, else local) gated by RaPTr.

    Where the local spec falls back to torch norms (no Apex), they are replaced by ones
    that support sequence parallelism. Transformer Engine's norms follow the config.
    """
    if use_transformer_engine is None:
        use_transformer_engine = gpt_layer_specs.HAVE_TE
    if use_transformer_engine:
        return raptr_layer_spec(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs))
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, **kwargs)
    norms = {name: SequenceParallelTorchNorm for name in ("input_layernorm", "pre_mlp_layernorm")
             if getattr(spec.submodules, name) is WrappedTorchNorm}
    return raptr_layer_spec(dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **norms)))


def get_bert_raptr_layer_spec(use_transformer_engine: bool = None) -> ModuleSpec:
    """Megatron's BERT layer spec (bidirectional, padding mask; Transformer Engine when installed,
    else local) gated by RaPTr. (Its torch-norm fallback needs no sequence-parallel variant: without
    Apex, Megatron's BERT head refuses sequence parallelism anyway.)"""
    if use_transformer_engine is None:
        use_transformer_engine = bert_layer_specs.HAVE_TE
    if use_transformer_engine:
        return raptr_layer_spec(bert_layer_specs.get_bert_layer_with_transformer_engine_spec())
    return raptr_layer_spec(bert_layer_specs.bert_layer_local_spec)


def get_gpt_raptr_block_spec(config: TransformerConfig, use_transformer_engine: bool = None,
                             **kwargs) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder block: RaPTr layers and a final norm like theirs."""
    if use_transformer_engine is None:
        use_transformer_engine = gpt_layer_specs.HAVE_TE
    layer = get_gpt_raptr_layer_spec(use_transformer_engine, config.normalization, **kwargs)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config),
        layer_norm=gpt_layer_specs.TENorm if use_transformer_engine else layer.submodules.input_layernorm,
    )


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

"""Builds the model (GPT or BERT), Megatron DDP, optimizer and LR schedule from parsed arguments."""

import argparse
import importlib.util
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_raptr import megatron_internals as internals
from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.training import checkpointing
from megatron_raptr.training.family import model_family
from megatron_raptr.training.initialize import current_device


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Rows of the embedding and output layer for a tokenizer of `vocab_size` ids.

    Megatron-LM pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP,
    so that tensor-parallel shards are equal; the padding thus changes with TP. Padding rows
    take probability mass too, so a run that loads a checkpoint keeps the checkpoint's
    padded size: resharding must not change the model. Raises ValueError naming the flag
    when this layout cannot hold it.
    """
    saved = checkpointing.saved_padded_vocab_size(args.load) if args.load else None
    tp = args.tensor_model_parallel_size
    if saved is None:
        multiple = args.make_vocab_size_divisible_by * tp
        return -(-vocab_size // multiple) * multiple
    if saved < vocab_size:
        raise ValueError(f"--load {args.load}: the checkpoint's vocabulary has {saved} rows, fewer than the "
                         f"tokenizer's {vocab_size} ids: resume with the tokenizer it was trained with")
    if saved % tp:
        raise ValueError(f"--load {args.load}: the checkpoint's vocabulary is padded to {saved} rows, which "
                         f"--tensor-model-parallel-size {tp} cannot split evenly: use a size that divides {saved} "
                         "(train with a larger --make-vocab-size-divisible-by to reshard to more ranks later)")
    return saved


# Megatron-LM's GPU fusions, on by default as there: flag (its --no- form turns the fusion off) -> the
# argument's dest (Megatron-LM's name) and what it fuses.
FUSIONS = {
    "--gradient-accumulation-fusion": ("gradient_accumulation_fusion", "gradient accumulation"),
    "--masked-softmax-fusion": ("masked_softmax_fusion", "masked softmax"),
    "--bias-gelu-fusion": ("bias_gelu_fusion", "bias-GeLU"),
    "--bias-swiglu-fusion": ("bias_swiglu_fusion", "bias-SwiGLU"),
    "--bias-dropout-fusion": ("bias_dropout_fusion", "bias-dropout-add"),
    "--rope-fusion": ("apply_rope_fusion", "RoPE"),
}
# Megatron-Core's own fused softmax kernels (Apex builds them); it imports them when it first runs one.
_SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")


def unavailable_fusions() -> Dict[str, str]:
    """Fusion flag -> why this machine cannot run it, for each one it cannot."""
    if not torch.cuda.is_available():
        from megatron_raptr.compat import cpu

        return dict.fromkeys(FUSIONS, cpu.NO_FUSED_KERNELS)
    missing = {}
    if not internals.grad_accum_fusion_available.get():  # Megatron's linear layers raise without it
        missing["--gradient-accumulation-fusion"] = "needs Apex's fused_weight_gradient_mlp_cuda extension"
    # Transformer Engine's attention fuses the softmax itself and ignores the flag.
    have_te = internals.gpt_specs_have_te.get()
    if not have_te and not all(importlib.util.find_spec(kernel) for kernel in _SOFTMAX_KERNELS):
        missing["--masked-softmax-fusion"] = "needs Megatron's fused softmax kernels (built by Apex)"
    if internals.fused_apply_rotary_pos_emb.get() is None:
        missing["--rope-fusion"] = "needs Transformer Engine"
    return missing


def resolve_fusions(args: argparse.Namespace) -> Dict[str, str]:
    """Sets each fusion's argument to a bool; returns what is left unfused -> why, for the defaults
    this machine cannot run.

    Not given (None): on where this machine can run it and the model has what it fuses. Given
    where it cannot run: ValueError naming the flag.
    """
    # Fusions of what only some models have: flag -> (the model has it, what it needs).
    model_needs = {"--bias-gelu-fusion": (not args.swiglu, "GeLU (no --swiglu)"),
                   "--bias-swiglu-fusion": (args.swiglu, "--swiglu"),
                   "--rope-fusion": (args.position_embedding_type == "rope", "--position-embedding-type rope")}
    unavailable, fallbacks = unavailable_fusions(), {}
    for flag, (dest, fused) in FUSIONS.items():
        asked, why = getattr(args, dest), None
        has, needed = model_needs.get(flag, (True, None))
        if not has:
            why = f"needs {needed}"
        elif flag in unavailable:
            why = unavailable[flag]
            if asked is None:
                fallbacks[fused] = why
        if asked and why:
            raise ValueError(f"{flag}: {why}")
        setattr(args, dest, why is None if asked is None else asked)
    return fallbacks


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    dtype = params_dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        use_cpu_initialization=args.use_cpu_initialization,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        # As Megatron-LM under virtual stages: separate p2p ops, overlapped with compute. Batched ones would
        # pair a rank's two sends to the same neighbour (PP=2: its previous and next rank) with the
        # wrong receives there.
        overlap_p2p_comm=args.virtual_pipeline_model_parallel_size is not None,
        batch_p2p_comm=args.virtual_pipeline_model_parallel_size is None,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        masked_softmax_fusion=args.masked_softmax_fusion,
        bias_activation_fusion=args.bias_swiglu_fusion if args.swiglu else args.bias_gelu_fusion,
        bias_dropout_fusion=args.bias_dropout_fusion,
        apply_rope_fusion=args.apply_rope_fusion,
        # As Megatron-LM: a sent activation's storage is freed, only its autograd graph is kept.
        deallocate_pipeline_outputs=args.pipeline_model_parallel_size > 1,
        add_bias_linear=args.add_bias_linear,
        **moe_config(args),
    )


def moe_config(args: argparse.Namespace) -> dict:
    """TransformerConfig's mixture-of-experts fields from Megatron-LM's MoE flags (none without --num-experts)."""
    if args.num_experts is None:
        return {}
    return dict(
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_layer_freq=args.moe_layer_freq,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.moe_grouped_gemm,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )


def build_model(args: argparse.Namespace, config: TransformerConfig) -> List[torch.nn.Module]:
    """This rank's model chunks (--model) with RaPTr-gated layers, each wrapped in Megatron DDP: one
    chunk, or one per virtual pipeline stage (the interleaved schedule).

    The baseline uses the same model: its path is simply every layer at every step.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        bucket_size=args.ddp_bucket_size,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    chunks = []
    virtual_stages = args.virtual_pipeline_model_parallel_size
    for vp_stage in range(virtual_stages) if virtual_stages else [None]:
        model = model_family(args).build_model(args, config, vp_stage)
        model.to(current_device())
        if args.bf16 or args.fp16:
            model = Float16Module(config, model)  # casts inputs to half, the last stage's output to fp32
        chunks.append(RaptrDistributedDataParallel(config, ddp_config, model,
                                                   skip_idle_grad_comm=args.raptr_skip_grad_comm))
    return chunks


def build_optimizer(
    args: argparse.Namespace, config: TransformerConfig, model: List[torch.nn.Module]
) -> Tuple[MegatronOptimizer, OptimizerParamScheduler]:
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=params_dtype(args),
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_param_gather=args.overlap_param_gather,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters,  # iterations, as the steps above (Megatron-LM: samples)
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
    # Megatron's schedules drive gradient sync through these hooks.
    config.no_sync_func = model[0].no_sync if len(model) == 1 else [chunk.no_sync for chunk in model]
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler

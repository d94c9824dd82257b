"""Command line of pretrain_raptr.py: Megatron-LM's flag names plus the method groups
(--raptr-*, --stacking-*, --pld-*)."""

import argparse
import importlib.util
import os
import re
from typing import List, Optional

import torch

from megatron_raptr import megatron_internals as internals
from megatron_raptr.pld import PLDSchedule
from megatron_raptr.schedule import SAMPLING_MODES, SCALING_RULES, RaptrSchedule
from megatron_raptr.stacking import COPY_MODES, OPTIMIZER_STATES, StackingSchedule
from megatron_raptr.training import bert, checkpointing, data
from megatron_raptr.training.family import FAMILIES, model_family
from megatron_raptr.training.model import FUSIONS, padded_vocab_size, resolve_fusions
from megatron_raptr.unsupported import add_refused_args, check_refused

# DeepSpeed's progressive layer drop defaults (Zhang and He's setting).
PLD_THETA, PLD_GAMMA = 0.5, 0.001
# Megatron-Core's OptimizerParamScheduler's WSD decay styles, Megatron-LM's default first.
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
# The flags that choose a method; a run trains with one.
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
METHOD_FLAGS = (("raptr", "raptr_schedule"), ("stacking", "stacking_schedule"), ("pld", "pld_theta"),
                ("pld", "pld_gamma"))


def _add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=FAMILIES, default="gpt",
                       help="gpt: decoder, next-token loss; bert: encoder, masked-LM loss (Megatron-Core's BertModel)")
    group.add_argument("--num-layers", type=int, required=True)
    group.add_argument("--hidden-size", type=int, required=True)
    group.add_argument("--num-attention-heads", type=int, required=True)
    group.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    group.add_argument("--seq-length", type=int, required=True)
    group.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    group.add_argument("--hidden-dropout", type=float, default=0.1)
    group.add_argument("--attention-dropout", type=float, default=0.1)
    group.add_argument("--init-method-std", type=float, default=0.02)
    group.add_argument("--use-cpu-initialization", action="store_true",
                       help="draw each weight whole from the CPU generator, then split it over tensor-parallel ranks "
                            "(Megatron-LM's flag: the weights Megatron-LM's loop builds on a CPU)")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    group.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    group.add_argument("--swiglu", action="store_true")
    group.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")


def _add_moe_args(parser):
    group = parser.add_argument_group("mixture of experts (Megatron-LM's flags; GPT only)")
    group.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer (default: dense layers)")
    group.add_argument("--moe-router-topk", type=int, default=2, help="experts each token is routed to")
    group.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="an expert's hidden size "
                       "(default: --ffn-hidden-size)")
    group.add_argument("--moe-layer-freq", type=_moe_layer_freq, default=1,
                       help="N: every Nth layer is MoE, the first included; or a pattern of 0 (dense) and 1 (MoE) "
                            "per layer as a Python list expression, e.g. '([0,1]*2)'")
    group.add_argument("--moe-router-load-balancing-type", choices=MOE_LOAD_BALANCING, default="aux_loss")
    group.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="weight of the load-balancing loss")
    group.add_argument("--moe-z-loss-coeff", type=float, default=None, help="weight of the router z-loss")
    group.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather")
    group.add_argument("--expert-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                       help="default: --tensor-model-parallel-size")
    group.add_argument("--moe-grouped-gemm", action="store_true",
                       help="experts as one grouped GEMM (needs Transformer Engine)")
    group.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false",
                       help="no biases in linear layers (needed with --num-experts)")


def _moe_layer_freq(text: str):
    """An int, or a list of 0 and 1 per layer written as a Python list expression (as Megatron-LM's)."""
    if "[" not in text:
        return int(text)
    if re.search(r"[^\d\s,\[\]()+*]", text):  # list arithmetic only, as Megatron-LM allows
        raise argparse.ArgumentTypeError(f"not a list expression of digits, [], (), + and *: {text!r}")
    try:
        pattern = eval(text)
    except Exception as error:
        raise argparse.ArgumentTypeError(f"not a list expression: {text!r} ({error})") from None
    if not isinstance(pattern, list) or not set(pattern) <= {0, 1}:
        raise argparse.ArgumentTypeError(f"expected a list of 0 (dense) and 1 (MoE), got {pattern!r}")
    return pattern


def _add_parallel_args(parser):
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                       help="interleaved pipeline schedule: each pipeline rank holds several model chunks (virtual "
                            "stages) of this many layers")
    group.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                       help="interleaved pipeline schedule: the number of model chunks (virtual stages) per pipeline "
                            "rank (exclusive with --num-layers-per-virtual-pipeline-stage)")
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="all-gather the distributed optimizer's parameters during the next forward "
                            "(needs --use-distributed-optimizer and --overlap-grad-reduce)")
    group.add_argument("--ddp-bucket-size", type=int, default=None,
                       help="parameters per gradient bucket under --overlap-grad-reduce (Megatron's default: "
                            "max(40M, 1M x DP size)); without overlap there is one bucket")
    group.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    group.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    group.add_argument("--recompute-num-layers", type=int, default=1)
    group.add_argument("--distributed-timeout-minutes", type=int, default=10)


def _add_fusion_args(parser):
    group = parser.add_argument_group("GPU fusions (Megatron-LM's; default: on where CUDA and the kernels are there)")
    for flag, (dest, fused) in FUSIONS.items():
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=f"fuse {fused}; asking for it where it cannot run is an error")


def _add_training_args(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, required=True)
    group.add_argument("--global-batch-size", type=int, default=None, help="default: micro x data-parallel size")
    group.add_argument("--train-iters", type=int, required=True)
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--lr", type=float, required=True)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                       default="linear", help="WSD: warmup, then --lr until the last --lr-wsd-decay-iters "
                                              "iterations of --lr-decay-iters, which decay to --min-lr")
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    # Default None so that giving them without --lr-decay-style WSD is detected.
    group.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default=None,
                       help=f"WSD's decay to --min-lr (default: {WSD_DECAY_STYLES[0]}, as Megatron-LM)")
    group.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD's decay phase, in iterations")
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--clip-grad", type=float, default=1.0)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                       help="stop every rank before the optimizer step when the loss or a gradient is NaN or Inf")


def _add_logging_args(parser):
    group = parser.add_argument_group("checkpointing, evaluation and logging")
    group.add_argument("--save", default=None)
    group.add_argument("--load", default=None)
    group.add_argument("--save-interval", type=int, default=None)
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--async-save", action="store_true",
                       help="write checkpoints in background processes while training goes on; each is committed "
                            "(named latest) once every rank has written it, at the latest by the next save or exit")
    group.add_argument("--ckpt-fully-parallel-save", action=argparse.BooleanOptionalAction, default=True,
                       help="spread the writing of replicated shards (model weights) over the data-parallel ranks")
    group.add_argument("--ckpt-fully-parallel-load", action="store_true",
                       help="read each replicated shard once, on one data-parallel rank, and send it to the others")
    group.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                       help="save the distributed optimizer's state gathered per parameter, loadable under another "
                            "TP/PP (default: each rank its own shard, loadable under the same TP and PP)")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="stop (after saving, with --save) once the iteration is divisible by this")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM, finish the step, save (on every rank at the same iteration) and exit 0")
    group.add_argument("--eval-interval", type=int, default=1000)
    group.add_argument("--eval-iters", type=int, default=10)
    group.add_argument("--skip-train", action="store_true",
                       help="evaluate the --load checkpoint's full model on the validation data and exit")
    group.add_argument("--multiple-validation-sets", action="store_true",
                       help="evaluate each --valid-data-path prefix separately (eval records name it)")
    group.add_argument("--log-interval", type=int, default=100)
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--metrics-file", default=None, help="JSON lines of train and eval records")


def _add_raptr_args(parser):
    group = parser.add_argument_group("RaPTr")
    group.add_argument("--raptr-schedule", default=None,
                       help="comma-separated LENGTH@START stages; START an iteration or a fraction of "
                            "--train-iters, e.g. 6@0,8@0.25,10@0.5,12@0.75. Without it: full-model baseline")
    group.add_argument("--raptr-fixed-layers", nargs="*", default=None, action=_LayerNumbers,
                       help="1-based layers always on the path, separated by commas or spaces "
                            "(default: first and last; no numbers: none)")
    # Defaults None so that giving them without --raptr-schedule is detected; the schedule fills them.
    group.add_argument("--raptr-sampling", choices=SAMPLING_MODES, default=None,
                       help=f"default: {RaptrSchedule.sampling}")
    group.add_argument("--raptr-scaling", choices=SCALING_RULES, default=None,
                       help=f"multiplier of a kept layer's residual update during training "
                            f"(default: {RaptrSchedule.scaling})")
    group.add_argument("--raptr-verify-sync", type=int, default=0, metavar="N",
                       help="every N iterations check that all ranks train the same path (0: never; any method)")
    group.add_argument("--raptr-stage-warmup-iters", type=int, default=0,
                       help="re-warm the learning rate linearly over this many iterations at each stage boundary "
                            "(RaPTr and gradual stacking)")
    group.add_argument("--raptr-stage-warmup-fraction", type=float, default=None,
                       help="the same as a fraction of --train-iters (as --lr-warmup-fraction is of the decay)")
    group.add_argument("--raptr-skip-grad-comm", action=argparse.BooleanOptionalAction, default=True,
                       help="do not reduce the gradient buckets of layers off the step's path across "
                            "data-parallel ranks (they are zero on every rank); any method")
    group.add_argument("--raptr-skip-optimizer-step", action=argparse.BooleanOptionalAction, default=None,
                       help="layers off the step's path take no optimizer step (weights and Adam state unchanged, "
                            "no weight decay) and, with the distributed optimizer, no "
                            "parameter all-gather; any method (default: on for RaPTr, chosen by measurement; "
                            "off for gradual stacking and progressive layer dropping)")
    group.add_argument("--raptr-catch-up-weight-decay", action="store_true",
                       help="with --raptr-skip-optimizer-step: a layer's first update after k skipped steps first "
                            "applies the k steps of weight decay it missed, (1 - lr x wd)^k at the step's LR "
                            "(lazy AdamW's rule)")


def _add_stacking_args(parser):
    group = parser.add_argument_group("gradual stacking")
    group.add_argument("--stacking-schedule", default=None,
                       help="comma-separated LENGTH@START stages: only the first LENGTH layers exist from START, "
                            "e.g. 6@0,9@0.33,12@0.67")
    # Defaults None so that giving them without --stacking-schedule is detected.
    group.add_argument("--stacking-copy", choices=COPY_MODES, default=None,
                       help=f"what the new layers copy: the top layers (Reddi et al.) or the middle block "
                            f"(MIDAS) (default: {StackingSchedule.copy})")
    group.add_argument("--stacking-optimizer-state", choices=OPTIMIZER_STATES, default=None,
                       help=f"the new layers' Adam moments: zero, or copied with the weights "
                            f"(default: {StackingSchedule.optimizer_state})")


def _add_pld_args(parser):
    group = parser.add_argument_group("progressive layer dropping")
    group.add_argument("--pld-theta", type=float, default=None,
                       help=f"theta-bar, the keep level theta(t) decays to (default with --pld-gamma: {PLD_THETA})")
    group.add_argument("--pld-gamma", type=float, default=None,
                       help=f"decay rate of theta(t) = (1 - theta-bar) exp(-gamma t) + theta-bar per iteration "
                            f"(default with --pld-theta: {PLD_GAMMA})")


class _LayerNumbers(argparse.Action):
    """Layer numbers as '1,8' (like --raptr-schedule) or '1 8'."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            numbers = [int(part) for value in values for part in value.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentError(
                self, f"expected layer numbers separated by commas or spaces, got {' '.join(values)!r}") from None
        setattr(namespace, self.dest, numbers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="RaPTr GPT and BERT pretraining on Megatron-Core", allow_abbrev=False)
    _add_model_args(parser)
    _add_moe_args(parser)
    _add_parallel_args(parser)
    _add_fusion_args(parser)
    _add_training_args(parser)
    _add_logging_args(parser)
    _add_raptr_args(parser)
    _add_stacking_args(parser)
    _add_pld_args(parser)
    data.add_data_args(parser)
    bert.add_args(parser)
    add_refused_args(parser)
    return parser


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parses and validates everything that can be checked before any work starts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args, world_size)
        data.validate_data_args(args)  # the data against the tokenizer that made it
        family = model_family(args)
        family.validate_data(args)
        args.padded_vocab_size = padded_vocab_size(family.build_tokenizer(args).vocab_size, args)
    except (ValueError, RuntimeError) as error:  # RuntimeError: checkpointing's --load errors
        parser.error(str(error))
    return args


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Fills derived defaults and raises ValueError naming the offending flag."""
    check_refused(args)
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if args.tensor_model_parallel_size < 1 or args.pipeline_model_parallel_size < 1 or world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size {args.pipeline_model_parallel_size}"
        )
    args.world_size = world_size
    args.data_parallel_size = world_size // model_parallel
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "train_iters", "log_interval", "eval_interval", "make_vocab_size_divisible_by",
                 "ffn_hidden_size", "max_position_embeddings", "global_batch_size", "lr_decay_iters",
                 "save_interval", "exit_interval", "ddp_bucket_size", "lr_wsd_decay_iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # None: not given, defaulted below
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                         f"{args.num_attention_heads}")
    if args.num_attention_heads % args.tensor_model_parallel_size:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.num_layers % args.pipeline_model_parallel_size:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size}")
    _validate_virtual_pipeline_args(args)
    _validate_moe_args(args)
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    bert.validate_args(args)
    args.unfused = resolve_fusions(args)  # what the one line of Megatron fallbacks names
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ValueError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if args.overlap_grad_reduce and args.data_parallel_size == 1:
        args.overlap_grad_reduce = args.overlap_param_gather = False  # nothing to overlap with
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.max_position_embeddings < args.seq_length:
        raise ValueError(f"--max-position-embeddings {args.max_position_embeddings} is shorter than "
                         f"--seq-length {args.seq_length}")
    micro_batches_per_step = args.micro_batch_size * args.data_parallel_size
    args.global_batch_size = args.global_batch_size or micro_batches_per_step
    if args.global_batch_size % micro_batches_per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // micro_batches_per_step
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % args.pipeline_model_parallel_size:
        # Megatron's interleaved schedule runs the microbatches in groups of PP.
        raise ValueError(f"--global-batch-size {args.global_batch_size}: the interleaved pipeline schedule (virtual "
                         f"stages) needs a number of microbatches that is a multiple of --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size}; it is {args.num_microbatches} (global batch / "
                         f"(--micro-batch-size {args.micro_batch_size} x data-parallel size {args.data_parallel_size}))")
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:  # Megatron's scheduler asserts it
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be less than --lr-decay-iters "
                         f"{args.lr_decay_iters} (default: --train-iters)")
    _validate_wsd_args(args)
    for flag in ("save_interval", "exit_signal_handler", "async_save", "dist_ckpt_optim_fully_reshardable"):
        if getattr(args, flag) and args.save is None:
            raise ValueError(f"--{flag.replace('_', '-')} needs --save")
    if args.dist_ckpt_optim_fully_reshardable and not args.use_distributed_optimizer:
        raise ValueError("--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer")
    if args.load:  # a checkpoint this layout cannot load
        checked = checkpointing.check_resumable(args.load, args.tensor_model_parallel_size,
                                                args.pipeline_model_parallel_size, args.use_distributed_optimizer,
                                                args.virtual_pipeline_model_parallel_size)
        if checked is not None:
            _check_resumed_lr_schedule(args, *checked)
    if args.skip_train and not (args.load and args.eval_iters):
        raise ValueError("--skip-train evaluates a checkpoint: it needs --load and --eval-iters > 0")
    if args.multiple_validation_sets and not args.valid_data_path:
        raise ValueError("--multiple-validation-sets needs --valid-data-path PREFIX [PREFIX ...]")
    if args.multiple_validation_sets and data.parse_blend(args.valid_data_path, "--valid-data-path")[1]:
        raise ValueError("--multiple-validation-sets: give --valid-data-path prefixes without weights")
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    for flag in ("raptr_verify_sync", "raptr_stage_warmup_iters", "eval_iters", "lr_warmup_iters", "num_workers"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must not be negative")
    for flag, directory in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir),
                            ("--metrics-file", args.metrics_file and os.path.dirname(os.path.abspath(args.metrics_file)))):
        _check_writable(flag, directory)
    if args.metrics_file and args.metrics_file == args.tensorboard_dir:
        raise ValueError("--metrics-file and --tensorboard-dir must differ")
    if args.tensorboard_dir:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
    args.raptr = build_schedule(args)  # the run's path schedule, whatever the method


def _validate_virtual_pipeline_args(args: argparse.Namespace) -> None:
    """Sets args.virtual_pipeline_model_parallel_size (None: the plain pipeline schedule) from
    Megatron-LM's two virtual pipeline flags."""
    per_stage, stages = args.num_layers_per_virtual_pipeline_stage, args.num_virtual_stages_per_pipeline_rank
    args.virtual_pipeline_model_parallel_size = None
    if per_stage is None and stages is None:
        return
    if per_stage is not None and stages is not None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank are "
                         "exclusive: give one")
    flag, value = (("--num-layers-per-virtual-pipeline-stage", per_stage) if per_stage is not None
                   else ("--num-virtual-stages-per-pipeline-rank", stages))
    if value < 1:
        raise ValueError(f"{flag} must be positive, got {value}")
    if args.pipeline_model_parallel_size == 1:
        raise ValueError(f"{flag}: virtual pipeline stages need --pipeline-model-parallel-size > 1")
    layers_per_rank = args.num_layers // args.pipeline_model_parallel_size
    if layers_per_rank % value:
        raise ValueError(f"{flag} {value} does not divide the {layers_per_rank} layers of each pipeline rank "
                         f"(--num-layers {args.num_layers} / --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size})")
    stages = stages if stages is not None else layers_per_rank // per_stage
    args.virtual_pipeline_model_parallel_size = stages if stages > 1 else None


def _validate_moe_args(args: argparse.Namespace) -> None:
    """Mixture of experts: the flags against the model and the parallel layout."""
    args.expert_tensor_parallel_size = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if args.num_experts is None:
        given = [flag for flag in ("moe_ffn_hidden_size", "moe_z_loss_coeff", "moe_grouped_gemm") if getattr(args, flag)]
        given += [flag for flag in ("expert_model_parallel_size",) if getattr(args, flag) != 1]
        if given:
            raise ValueError(f"{_flag(given[0])} needs --num-experts")
        return
    if args.model != "gpt":
        raise ValueError(f"--num-experts: mixture of experts is for --model gpt, not {args.model}")
    if importlib.util.find_spec("megatron.core.transformer.moe.moe_logging") is None:
        raise ValueError("--num-experts needs a megatron-core with its MoE metrics tracker "
                         "(megatron.core.transformer.moe.moe_logging; tested: 0.19.2)")
    if args.stacking_schedule is not None:
        raise ValueError("--num-experts: gradual stacking (--stacking-schedule) does not grow MoE models yet")
    for flag in ("num_experts", "moe_router_topk", "expert_model_parallel_size", "expert_tensor_parallel_size",
                 "moe_ffn_hidden_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"{_flag(flag)} must be positive, got {getattr(args, flag)}")
    if args.moe_router_topk > args.num_experts:
        raise ValueError(f"--moe-router-topk {args.moe_router_topk} exceeds --num-experts {args.num_experts}")
    if args.num_experts % args.expert_model_parallel_size:
        raise ValueError(f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size "
                         f"{args.expert_model_parallel_size}")
    expert_model_parallel = args.expert_model_parallel_size * args.expert_tensor_parallel_size
    if (args.world_size // args.pipeline_model_parallel_size) % expert_model_parallel:
        raise ValueError(f"--expert-model-parallel-size {args.expert_model_parallel_size} x "
                         f"--expert-tensor-parallel-size {args.expert_tensor_parallel_size} does not divide the "
                         f"{args.world_size // args.pipeline_model_parallel_size} ranks of a pipeline stage")
    if isinstance(args.moe_layer_freq, list) and len(args.moe_layer_freq) != args.num_layers:
        raise ValueError(f"--moe-layer-freq: the pattern has {len(args.moe_layer_freq)} layers, "
                         f"--num-layers {args.num_layers}")
    if isinstance(args.moe_layer_freq, int) and args.moe_layer_freq < 1:
        raise ValueError(f"--moe-layer-freq must be positive, got {args.moe_layer_freq}")
    if args.add_bias_linear:
        raise ValueError("--num-experts needs --disable-bias-linear: Megatron-Core's experts with biases fail in "
                         "their first backward (an in-place add on a view of a tensor-parallel output)")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        raise ValueError("--num-experts with --tensor-model-parallel-size > 1 needs --sequence-parallel (Megatron-Core's "
                         "MoE layers refuse to train without it)")
    if args.moe_grouped_gemm and not internals.gpt_specs_have_te.get():
        raise ValueError("--moe-grouped-gemm needs Transformer Engine (Megatron's local experts run one by one)")


def _validate_wsd_args(args: argparse.Namespace) -> None:
    """WSD's decay phase: the last --lr-wsd-decay-iters of --lr-decay-iters, after the warmup."""
    if args.lr_decay_style != "WSD":
        given = [flag for flag in ("lr_wsd_decay_style", "lr_wsd_decay_iters") if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"{_flag(given[0])} needs --lr-decay-style WSD")
        return
    if args.lr_wsd_decay_iters is None:  # Megatron's scheduler asserts it
        raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (the decay phase's length)")
    args.lr_wsd_decay_style = args.lr_wsd_decay_style or WSD_DECAY_STYLES[0]
    # Megatron's scheduler would start the decay inside the warmup: the LR would jump down after it.
    decay_span = args.lr_decay_iters - args.lr_warmup_iters
    if args.lr_wsd_decay_iters > decay_span:
        raise ValueError(f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters} exceeds the {decay_span} iterations "
                         f"between --lr-warmup-iters {args.lr_warmup_iters} and --lr-decay-iters "
                         f"{args.lr_decay_iters} (default: --train-iters)")


def _check_resumed_lr_schedule(args: argparse.Namespace, path: str, common: dict) -> None:
    """Megatron's scheduler resumes the checkpoint's decay style whatever the flag says (as Megatron-LM's
    does), and WSD's decay length is not in the checkpoint: a different style would be ignored, or fail."""
    saved = common["opt_param_scheduler"]["lr_decay_style"]
    if saved != args.lr_decay_style:
        raise ValueError(f"--load {args.load}: {path} continues its LR schedule, --lr-decay-style {saved}, "
                         f"but this run gives --lr-decay-style {args.lr_decay_style}: resume with {saved}"
                         + (" and its --lr-wsd-decay-iters" if saved == "WSD" else ""))


def default_num_workers() -> int:
    """Megatron-LM's 2 loader processes per rank where there is CUDA; on the CPU they would
    only take cores from training (megatron_raptr.compat.cpu)."""
    if torch.cuda.is_available():
        return 2
    from megatron_raptr.compat import cpu

    return cpu.DATA_LOADER_WORKERS


def _check_writable(flag: str, directory: Optional[str]) -> None:
    """Outputs must be writable before training, not found unwritable at the first save."""
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag}: cannot create {directory} ({error.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{flag}: {directory} is not writable")


def build_schedule(args: argparse.Namespace):
    """The run's schedule, and args.method and args.method_flags (what a checkpoint records), and
    the method's default for --raptr-skip-optimizer-step.

    Without a method flag, the full model at every step (the baseline).
    """
    if args.raptr_stage_warmup_fraction is not None:
        if args.raptr_stage_warmup_iters:
            raise ValueError("--raptr-stage-warmup-fraction and --raptr-stage-warmup-iters: give one")
        if not 0.0 <= args.raptr_stage_warmup_fraction < 1.0:
            raise ValueError(f"--raptr-stage-warmup-fraction must lie in [0, 1), got {args.raptr_stage_warmup_fraction}")
        args.raptr_stage_warmup_iters = round(args.raptr_stage_warmup_fraction * args.train_iters)
    given = [(method, flag) for method, flag in METHOD_FLAGS if getattr(args, flag) is not None]
    other = [flag for method, flag in given if method != given[0][0]] if given else []
    if other:
        raise ValueError(f"{_flag(given[0][1])} and {_flag(other[0])} choose different methods: give one")
    args.method = given[0][0] if given else "baseline"
    if args.raptr_skip_optimizer_step is None:  # the defaults study measured it for RaPTr only
        args.raptr_skip_optimizer_step = args.method == "raptr"
    if args.raptr_catch_up_weight_decay and not args.raptr_skip_optimizer_step:
        raise ValueError("--raptr-catch-up-weight-decay needs --raptr-skip-optimizer-step (without it skipped "
                         "layers decay at every step)")
    args.method_flags = " ".join(f"{_flag(flag)} {getattr(args, flag)}" for _, flag in given)
    _needs(args, "raptr", ["raptr_fixed_layers", "raptr_sampling", "raptr_scaling"], "--raptr-schedule")
    _needs(args, "stacking", ["stacking_copy", "stacking_optimizer_state"], "--stacking-schedule")
    if args.raptr_verify_sync and args.method == "baseline":
        raise ValueError("--raptr-verify-sync needs a method: --raptr-schedule, --stacking-schedule or --pld-theta")
    if args.raptr_stage_warmup_iters and args.method not in ("raptr", "stacking"):
        given = "fraction" if args.raptr_stage_warmup_fraction is not None else "iters"
        raise ValueError(f"--raptr-stage-warmup-{given} needs stages: --raptr-schedule or --stacking-schedule")
    if args.method == "stacking":
        options = {name: getattr(args, f"stacking_{name}") for name in ("copy", "optimizer_state")
                   if getattr(args, f"stacking_{name}") is not None}
        return StackingSchedule.parse(args.stacking_schedule, args.num_layers, args.train_iters, **options)
    if args.method == "pld":
        theta = PLD_THETA if args.pld_theta is None else args.pld_theta
        gamma = PLD_GAMMA if args.pld_gamma is None else args.pld_gamma
        return PLDSchedule(theta, gamma, args.num_layers)
    if args.method == "baseline":
        return RaptrSchedule.full_model(args.num_layers)
    options = {name: getattr(args, f"raptr_{name}") for name in ("fixed_layers", "sampling", "scaling")
               if getattr(args, f"raptr_{name}") is not None}
    return RaptrSchedule.parse(args.raptr_schedule, args.num_layers, args.train_iters, **options)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _needs(args: argparse.Namespace, method: str, dests: List[str], method_flag: str) -> None:
    """A method's own flags would have nothing to act on under another method."""
    for dest in dests:
        if getattr(args, dest) is not None and args.method != method:
            raise ValueError(f"{_flag(dest)} needs {method_flag}")

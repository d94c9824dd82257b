"""Megatron-LM options RaPTr refuses, and why: one table for both loops.

pretrain_raptr.py accepts these flags only to refuse them with the reason (an unknown flag would
be refused without one); Megatron-LM's loop has them anyway. Each is refused before any work.
"""

from typing import Callable, Dict, Tuple

_FLAG = dict(action="store_true")
_NOT_COUNTED = ("RaPTr's optimizer step (each layer's own Adam step count, no step for skipped layers) "
                "does not reach it, and this machine cannot test it (it needs CUDA)")

_UNPROVEN = "neither the CPU tests nor tools/gpu_check.sh cover it"

# dest -> (the flag as the user writes it, whether the value asks for the option, why it is refused,
# pretrain_raptr.py's argparse keywords for it)
REFUSED: Dict[str, Tuple[str, Callable[[object], bool], str, dict]] = {
    "optimizer": ("--optimizer", lambda value: value != "adam",
                  "RaPTr's optimizer semantics for skipped layers (each layer's own bias-correction count, "
                  "no step off the path) are Adam's; other optimizers (and Muon's layer-wise distributed "
                  "optimizer) would update skipped layers by other rules", dict(default="adam")),
    "use_precision_aware_optimizer": (
        "--use-precision-aware-optimizer", bool,
        "Transformer Engine's FusedAdam then takes gradients from .decoupled_grad: " + _NOT_COUNTED, _FLAG),
    "optimizer_cpu_offload": (
        "--optimizer-cpu-offload", bool,
        "Megatron's HybridDeviceOptimizer steps CPU copies of the parameters: " + _NOT_COUNTED, _FLAG),
    "overlap_param_gather_with_optimizer_step": (
        "--overlap-param-gather-with-optimizer-step", bool,
        "it launches the first all-gather inside the optimizer step, before the groups the step left "
        "unchanged are known, and needs the interleaved pipeline schedule", _FLAG),
    "fp8": ("--fp8-format", bool,
            "no FP8 recipe has been run with skipped layers (delayed scaling keeps amax histories that a "
            f"skipped layer does not update); {_UNPROVEN}", dict(default=None)),
    "fp4": ("--fp4-format", bool, f"FP4 has not been run with skipped layers; {_UNPROVEN}", dict(default=None)),
    "use_megatron_fsdp": (
        "--use-megatron-fsdp", bool,
        "a skipped layer's parameter shards would never be reduced or gathered: use Megatron's DDP, with "
        "--use-distributed-optimizer to shard the optimizer state", _FLAG),
    "use_torch_fsdp2": (
        "--use-torch-fsdp2", bool,
        "a skipped layer's parameter shards would never be reduced or gathered: use Megatron's DDP, with "
        "--use-distributed-optimizer to shard the optimizer state", _FLAG),
    "context_parallel_size": (
        "--context-parallel-size", lambda value: value > 1,
        f"context parallelism needs Transformer Engine's attention, which no CPU runs, and {_UNPROVEN}",
        dict(type=int, default=1)),
    "cuda_graph_impl": (
        "--cuda-graph-impl", lambda value: value != "none",
        "a replayed CUDA graph runs the layers it captured, whatever the step's path (Megatron-LM's "
        "--enable-cuda-graph and --external-cuda-graph set this flag too)", dict(default="none")),
    "mtp_num_layers": (
        "--mtp-num-layers", bool,
        "multi-token prediction's layers are not TransformerLayers of the decoder: they would run at every "
        f"step, off the path and uncounted in the FLOPs; {_UNPROVEN}", dict(type=int, default=None)),
}


def add_refused_args(parser) -> None:
    """pretrain_raptr.py: the refused flags, so that check_refused names each with its reason."""
    group = parser.add_argument_group("Megatron-LM options RaPTr refuses (accepted to say why)")
    for dest, (flag, _, reason, keywords) in REFUSED.items():
        group.add_argument(flag, dest=dest, help=f"refused: {reason}", **keywords)


def check_refused(args) -> None:
    """Raises ValueError naming the first refused option `args` asks for, and why."""
    for dest, (flag, asks, reason, _) in REFUSED.items():
        value = getattr(args, dest, None)
        if value is not None and asks(value):
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            raise ValueError(f"{shown}: refused with RaPTr: {reason}")

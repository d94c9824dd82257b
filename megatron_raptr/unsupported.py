"""Megatron-LM options RaPTr refuses, and why: one table for both loops.

pretrain_raptr.py accepts these flags only to refuse them with the reason (an unknown flag would
be refused without one); Megatron-LM's loop has them anyway. Each is refused before any work.
"""

from typing import Callable, Dict, Tuple

_NOT_COUNTED = ("RaPTr's optimizer step (each layer's own Adam step count, no step for skipped layers) "
                "does not reach it, and this machine cannot test it (it needs CUDA)")

# dest -> (the flag as the user writes it, whether the value asks for the option, why it is refused)
REFUSED: Dict[str, Tuple[str, Callable[[object], bool], str]] = {
    "optimizer": ("--optimizer", lambda value: value != "adam",
                  "RaPTr's optimizer semantics for skipped layers (each layer's own bias-correction count, "
                  "no step off the path) are Adam's; other optimizers (and Muon's layer-wise distributed "
                  "optimizer) would update skipped layers by other rules"),
    "use_precision_aware_optimizer": (
        "--use-precision-aware-optimizer", bool,
        "Transformer Engine's FusedAdam then takes gradients from .decoupled_grad: " + _NOT_COUNTED),
    "optimizer_cpu_offload": (
        "--optimizer-cpu-offload", bool,
        "Megatron's HybridDeviceOptimizer steps CPU copies of the parameters: " + _NOT_COUNTED),
    "overlap_param_gather_with_optimizer_step": (
        "--overlap-param-gather-with-optimizer-step", bool,
        "it launches the first all-gather inside the optimizer step, before the groups the step left "
        "unchanged are known, and needs the interleaved pipeline schedule"),
    "fp8": ("--fp8-format", bool,
            "no FP8 recipe has been run with skipped layers (delayed scaling keeps amax histories that a "
            "skipped layer does not update); neither the CPU tests nor tools/gpu_check.sh cover it"),
    "fp4": ("--fp4-format", bool,
            "FP4 has not been run with skipped layers; neither the CPU tests nor tools/gpu_check.sh cover it"),
}


def add_refused_args(parser) -> None:
    """pretrain_raptr.py: the refused flags, so that check_refused names each with its reason."""
    group = parser.add_argument_group("Megatron-LM options RaPTr refuses (accepted to say why)")
    for dest, (flag, _, reason) in REFUSED.items():
        if dest == "optimizer":
            group.add_argument(flag, default="adam", help=f"adam only: {reason}")
        elif dest in ("fp8", "fp4"):
            group.add_argument(flag, dest=dest, default=None, help=f"refused: {reason}")
        else:
            group.add_argument(flag, action="store_true", help=f"refused: {reason}")


def check_refused(args) -> None:
    """Raises ValueError naming the first refused option `args` asks for, and why."""
    for dest, (flag, asks, reason) in REFUSED.items():
        value = getattr(args, dest, None)
        if value is not None and asks(value):
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            raise ValueError(f"{shown}: refused with RaPTr: {reason}")

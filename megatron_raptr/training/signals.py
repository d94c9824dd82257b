"""--exit-signal-handler: SIGTERM (SLURM's warning before a time limit or preemption) makes the
run save and stop after the current step instead of dying."""

import signal

import torch
import torch.distributed as dist

from megatron_raptr.training.initialize import current_device


class ExitSignalHandler:
    """While active, SIGTERM only sets a flag; on exit the previous handler is restored.

    Ranks may get the signal at different steps, or not at all (each node's processes are
    signalled separately), so the loop asks received_on_any_rank() after every step: one
    all-reduce, and every rank stops at the same iteration.
    """

    def __init__(self):
        self.received = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info):
        # None: the previous handler was not installed from Python; fall back to the default.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _handle(self, signum, frame):
        self.received = True

    def received_on_any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], device=current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

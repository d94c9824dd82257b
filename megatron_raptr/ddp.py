"""Megatron DDP whose gradient buckets do not wait for skipped layers.

With ``overlap_grad_reduce`` Megatron launches a bucket's all-reduce (or
reduce-scatter) once every parameter in it has reported a gradient during the
last microbatch. A skipped layer never reports, so its buckets never launch and
``finish_grad_sync`` fails. Here the skipped parameters are reported ready (their
main_grad stays zero) as soon as the last microbatch begins, which is also the
moment Megatron starts counting. The first step records the per-parameter counts
every later step must reach, so the skipped parameters are reported in it too.
"""

from contextlib import contextmanager
from typing import Iterable, Optional

from megatron.core.distributed import DistributedDataParallel


class RaptrDistributedDataParallel(DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skipped = ()
        self._skipped_reported = False

    def set_skipped_parameters(self, params: Iterable) -> None:
        """Parameters of this step's off-path layers; call before the step's forward."""
        self._skipped = tuple(params)

    @contextmanager
    def no_sync(self):
        # Megatron's schedules leave no_sync right before the last microbatch's backward.
        with super().no_sync():
            yield
        self._report_skipped_ready()

    def finish_grad_sync(self, force_all_reduce: Optional[bool] = False):
        # For loops that never enter no_sync (a single microbatch without no_sync_func).
        self._report_skipped_ready()
        super().finish_grad_sync(force_all_reduce=force_all_reduce)

    def zero_grad_buffer(self):
        super().zero_grad_buffer()
        self._skipped_reported = False

    def _report_skipped_ready(self):
        # Evaluation runs the full model and must not count towards a training step.
        if self._skipped_reported or not self.ddp_config.overlap_grad_reduce or not self.training:
            return
        self._skipped_reported = True
        for param in self._skipped:
            self.param_to_bucket_group[param].register_grad_ready(param, self.force_all_reduce)

"""Megatron DDP that neither waits for nor communicates the gradients of skipped layers.

Waiting: with ``overlap_grad_reduce`` Megatron launches a bucket's all-reduce (or
reduce-scatter) once every parameter in it has reported a gradient during the last
microbatch. A skipped layer never reports, so its buckets never launch and
``finish_grad_sync`` fails. Here the skipped parameters are reported ready (their
main_grad stays zero) as soon as the last microbatch begins, which is also the
moment Megatron starts counting. The first step records the per-parameter counts
every later step must reach, so the skipped parameters are reported in it too.

Communicating: the path is the same on every rank, so a bucket group whose
parameters are all off the path holds zeros on every rank, and its reduced result
(or reduce-scatter shard) is the zeros already in place. Such groups are not
communicated at all (``skip_idle_grad_comm``). To make that apply to every skipped
layer, each transformer layer gets a bucket of its own where Megatron takes a
parameter layout (``full_param_layout``, megatron-core 0.17+), with or without the
distributed optimizer; on 0.16 Megatron's size-based buckets stay, and only buckets
entirely off the path are skipped.
Gathering: the distributed optimizer all-gathers every bucket's parameters after each
step. Where the optimizer leaves skipped layers unchanged (``--raptr-skip-optimizer-step``,
megatron_raptr/optimizer_step.py sets ``skipped_take_no_step``), a bucket group whose parameters
were all skipped needs no all-gather: every rank already holds its values. Without
``overlap_param_gather`` the all-gather after the step leaves such groups out. With it,
Megatron gathers a group in the forward pre-hooks of its modules, which skipped layers
never run: a group changed by the last step whose parameters are all off this step's path
is gathered before the forward instead, and the prefetch chain links only the groups the
hooks will gather. A group is marked gathered (``param_gather_dispatched``) exactly when
the last optimizer step left it unchanged, which is what the next forward's hooks read.
"""

import inspect
import itertools
from contextlib import contextmanager
from typing import Iterable, Optional

from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_raptr import megatron_internals as internals

TAKES_PARAM_LAYOUT = "full_param_layout" in inspect.signature(DistributedDataParallel.__init__).parameters
if TAKES_PARAM_LAYOUT:
    internals.check(internals.PARAM_LAYOUT)


class RaptrDistributedDataParallel(DistributedDataParallel):
    def __init__(self, config, ddp_config, module, *args, skip_idle_grad_comm: bool = True, **kwargs):
        self.skip_idle_grad_comm = skip_idle_grad_comm
        # Also when not skipping: both then share one layout, so their results agree bit for bit
        # (the distributed optimizer's shard boundaries set the grad norm's summation order).
        if TAKES_PARAM_LAYOUT:
            kwargs["full_param_layout"] = per_layer_param_layout(module, ddp_config)
        super().__init__(config, ddp_config, module, *args, **kwargs)
        self._skipped = ()
        self._off_path_groups = set()  # bucket groups whose parameters are all skipped this step
        self._skipped_reported = False
        self.skipped_take_no_step = False
        self.path = None  # the path applied last (PathSetter), which the optimizer step counts

    @property
    def skipped_parameters(self) -> tuple:
        return self._skipped

    def set_skipped_parameters(self, params: Iterable) -> None:
        """Parameters of this step's off-path layers; call before the step's forward (and after the
        previous optimizer step)."""
        self._skipped = tuple(params)
        skipped = set(self._skipped)
        self._off_path_groups = {group for group in self._all_bucket_groups() if group.params <= skipped}
        if self.ddp_config.overlap_param_gather:
            self._prepare_param_gather()

    @contextmanager
    def no_sync(self):
        # Megatron's schedules leave no_sync right before the last microbatch's backward.
        with super().no_sync():
            yield
        self._report_skipped_ready()

    def start_grad_sync(self, *unused):
        for group in self._busy_bucket_groups():
            group.start_grad_sync()

    def finish_grad_sync(self, force_all_reduce: Optional[bool] = False):
        # For loops that never enter no_sync (a single microbatch without no_sync_func).
        self._report_skipped_ready()
        for group in self._busy_bucket_groups():
            group.finish_grad_sync(force_all_reduce=force_all_reduce)
        if self.ddp_config.overlap_param_gather:
            self._mark_params_to_gather()

    @contextmanager
    def param_sync_of_changed_groups(self):
        """Around the optimizer step (without overlap_param_gather): the all-gather after it
        leaves out the groups the step leaves unchanged. Megatron's all-gather walks these
        lists (DistributedDataParallel.start_param_sync; megatron-core 0.19's
        DistributedOptimizer walks them itself)."""
        if self.ddp_config.overlap_param_gather or not self.skipped_take_no_step:
            yield
            return
        groups = self.bucket_groups, self.expert_parallel_bucket_groups
        self.bucket_groups, self.expert_parallel_bucket_groups = (
            [group for group in part if group not in self._off_path_groups] for part in groups)
        try:
            yield
        finally:
            self.bucket_groups, self.expert_parallel_bucket_groups = groups

    def _mark_params_to_gather(self):
        # After the backward, before the optimizer step; Megatron marks every group it reduced as
        # not gathered (start_grad_sync). The forward has finished every gather (hooks, or
        # _prepare_param_gather), except prefetches into layers that did not run: wait for those.
        unchanged = self._off_path_groups if self.skipped_take_no_step else set()
        for group in self._all_bucket_groups():
            if group.param_gather_handle is not None:
                group.finish_param_sync(skip_next_bucket_dispatch=True)
            group.param_gather_dispatched = group in unchanged

    def _prepare_param_gather(self):
        # Before the forward: gather now what the last step changed and no hook of this step will
        # gather; chain the prefetches over the groups the hooks will gather, in Megatron's order.
        for groups in (self.bucket_groups, self.expert_parallel_bucket_groups):
            pending = [group for group in reversed(groups) if not group.param_gather_dispatched]
            for group in pending:
                if group in self._off_path_groups:
                    group.start_param_sync(force_sync=True)
            hooked = [group for group in pending if not group.param_gather_dispatched]
            for group in groups:
                group.next_param_gather_bucket_group = None
            for group, following in zip(hooked, hooked[1:]):
                group.next_param_gather_bucket_group = following

    def zero_grad_buffer(self):
        super().zero_grad_buffer()
        self._skipped_reported = False

    def _all_bucket_groups(self):
        return self.bucket_groups + self.expert_parallel_bucket_groups

    @property
    def _idle_groups(self):
        """The bucket groups not communicated this step."""
        return self._off_path_groups if self.skip_idle_grad_comm else set()

    def _busy_bucket_groups(self):
        idle = self._idle_groups
        return [group for group in self._all_bucket_groups() if group not in idle]

    def _report_skipped_ready(self):
        # Evaluation runs the full model and must not count towards a training step.
        if self._skipped_reported or not self.ddp_config.overlap_grad_reduce or not self.training:
            return
        self._skipped_reported = True
        idle = self._idle_groups
        for param in self._skipped:
            group = self.param_to_bucket_group[param]
            # An idle group must not launch; in its first step reporting only counts (no
            # launch), and those counts are what every later step's launch waits for.
            if group not in idle or group.is_first_batch:
                group.register_grad_ready(param, self.force_all_reduce)


def per_layer_param_layout(module, ddp_config):
    """Megatron's own buffer layout, applied to each transformer layer's parameters
    (and to each run of parameters between layers) apart, then concatenated: every
    bucket then lies within one layer. Padding and alignment are Megatron's: the
    distributed optimizer's (each part ends padded to a multiple of the DP size and of
    128, so shifting a part by the parts before it keeps its alignment) or plain DDP's
    (no padding)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.param_layout import FullParamLayout, PerBufferParamLayout

    # A layer larger than an explicit --ddp-bucket-size is split into buckets of about that size.
    bucket_size = ddp_config.bucket_size if ddp_config.overlap_grad_reduce else None
    def shards(key):
        """The distributed optimizer's shards of a buffer: over the data-parallel ranks, or for
        expert-parallel parameters over the expert data-parallel ranks (None: no optimizer shards)."""
        if not ddp_config.use_distributed_optimizer:
            return None
        if key.is_expert_parallel:
            return parallel_state.get_expert_data_parallel_world_size()
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def part_layout(params, dp_size):
        if dp_size is None:
            return internals.compute_default_per_buffer_param_layout(params, bucket_size)
        return internals.compute_per_buffer_param_layout(params, bucket_size, dp_size, ddp_config)

    owner = {param: layer for layer in module.modules() if isinstance(layer, TransformerLayer)
             for param in layer.parameters()}
    params = [param for param in module.parameters() if param.requires_grad]
    layouts = {}
    for key, (buffer_params, param_indices) in internals.group_params_for_buffers(
            params, ddp_config.grad_reduce_in_fp32).items():
        dp_size = shards(key)
        layout = PerBufferParamLayout(param_indices=param_indices, num_optimizer_shards=dp_size)
        end = 0
        # Megatron fills a buffer from its last parameter backwards (backward-pass order).
        for _, run in itertools.groupby(reversed(buffer_params), key=owner.get):
            part = part_layout(list(run)[::-1], dp_size)
            first_bucket = len(layout.bucket_indices)
            for param, (start, stop, bucket) in part.param_index_map.items():
                layout.param_index_map[param] = (start + end, stop + end, bucket + first_bucket)
            layout.bucket_indices += [(start + end, stop + end) for start, stop in part.bucket_indices]
            layout.per_bucket_numel_unpadded += part.per_bucket_numel_unpadded
            end = layout.bucket_indices[-1][1]
        if ddp_config.use_distributed_optimizer:
            # Megatron-Core's fully_reshardable checkpoint gathers the optimizer state of a buffer
            # as its buckets without their end padding, then slices it at the parameters' padded
            # offsets ("param range exceeds unpadded buffer"). Counting every bucket's padding but
            # the last one's as content keeps the two aligned.
            layout.per_bucket_numel_unpadded[:-1] = [stop - start for start, stop in layout.bucket_indices[:-1]]
        layouts[key] = layout
    return FullParamLayout(layouts=layouts)

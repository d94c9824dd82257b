"""The method's work at each training step, one object for every loop: pretrain_raptr.py's
Trainer, Megatron-LM's train_step (megatron_raptr/megatron_lm.py) and the benchmarks.

A loop calls ``start(iteration)`` before its forward and backward and ``finish(...)`` after its
optimizer step; between them it runs the step its own way. ``start`` runs the stage hooks when
a stage begins (gradual stacking's growth first), applies the step's path to the model (checked
across ranks with --raptr-verify-sync) and scales the learning rate; ``finish`` counts the
step's FLOPs and writes its metrics record. Building it installs the optimizer's per-layer
step counts (megatron_raptr/optimizer_step.py). Paths are a pure function of the seed and the
iteration, so every rank and pipeline stage agrees with no communication, and a resumed run
replays an uninterrupted one.
"""

import math
import time
from functools import partial
from typing import Dict, List, Optional, Sequence

from megatron.core.optimizer import MegatronOptimizer
from megatron.core.transformer import TransformerConfig

from megatron_raptr.flops import schedule_flops_fraction, step_flops
from megatron_raptr.hooks import StageHook
from megatron_raptr.layer import ModelChunks, PathSetter
from megatron_raptr.layout import pipeline_layout
from megatron_raptr.methods import Schedule, build_sampler, method_hooks
from megatron_raptr.moe import step_aux_losses
from megatron_raptr.optimizer_step import install_optimizer_step
from megatron_raptr.sampler import Path
from megatron_raptr.sync import verify_path_sync
from megatron_raptr.training.initialize import current_device
from megatron_raptr.training.metrics import MetricsWriter, is_last_rank, log, perplexity


class StepRuntime:
    """``args``: the run's flags (Megatron-LM's or pretrain_raptr.py's: --seed, --global-batch-size,
    --seq-length, the --raptr-* flags, --metrics-file; args.method and args.padded_vocab_size)."""

    def __init__(self, args, schedule: Schedule, config: TransformerConfig, model: ModelChunks,
                 optimizer: MegatronOptimizer, hooks: Sequence[StageHook] = (), head_flops_per_token: float = 0.0,
                 tensorboard_dir: Optional[str] = None, keep_moe_metrics: bool = False):
        self.args, self.schedule, self.config, self.optimizer = args, schedule, config, optimizer
        layout = pipeline_layout(config)
        self.sampler = build_sampler(schedule, args.seed, layout)
        self.missed_steps = install_optimizer_step(optimizer, model, args.raptr_skip_optimizer_step, self.sampler,
                                                   args.raptr_catch_up_weight_decay)
        self.hooks = method_hooks(schedule, model, optimizer, layout) + list(hooks)
        self.set_path = PathSetter(model)
        self.tokens_per_step = args.global_batch_size * args.seq_length
        self.head_flops_per_token = head_flops_per_token
        self.flops = partial(step_flops, config, args.padded_vocab_size, args.seq_length, self.tokens_per_step,
                             head_flops_per_token=head_flops_per_token)
        self.metrics = MetricsWriter(args.metrics_file, tensorboard_dir, enabled=is_last_rank())
        # Megatron-LM's loop logs and resets the MoE metrics tracker itself after the step.
        self.keep_moe_metrics = keep_moe_metrics
        self.stage: Optional[int] = None  # the stage whose hooks ran last
        self.path: Optional[Path] = None  # the path applied last
        self.lr: Optional[float] = None  # the step's learning rate, after the hooks' scaling
        self.cumulative_flops = 0.0
        self._clock_start = time.perf_counter()

    def resume(self, iteration: int, cumulative_flops: Optional[float] = None, elapsed_s: float = 0.0) -> None:
        """Continues a run after ``iteration`` steps: the FLOPs spent so far (when the checkpoint
        does not hold them, those of this run's paths) and the training time."""
        if cumulative_flops is None:
            cumulative_flops = sum(self.flops(self.sampler.path(t).active) for t in range(iteration))
        self.cumulative_flops = cumulative_flops
        self._clock_start = time.perf_counter() - elapsed_s

    def plan(self, train_iters: int) -> str:
        """The schedule and its expected FLOPs, for the log before training."""
        fraction = schedule_flops_fraction(self.schedule, train_iters, self.config, self.args.padded_vocab_size,
                                           self.args.seq_length, self.head_flops_per_token)
        return (f"{self.schedule.describe(train_iters)}\n"
                f"  expected model FLOPs vs full training (output layer included): {fraction:.3f}")

    def start(self, iteration: int) -> Path:
        """Before the step at ``iteration`` (0-based): stage hooks, the path, the learning rate."""
        stage = self.schedule.stage_index(iteration)
        if stage != self.stage:  # a boundary, or the stage in progress when a run starts or resumes
            self.stage = stage
            for hook in self.hooks:
                hook.on_stage_start(self.schedule, stage, iteration)
            log(f"entering stage {stage} at iteration {iteration}: {self.schedule.stage_summary(stage)}")
        path = self.sampler.path(iteration)
        if self.args.raptr_verify_sync and iteration % self.args.raptr_verify_sync == 0:
            verify_path_sync(path, current_device())
        self.set_path(path)
        self.path = path
        lr_scale = math.prod(hook.lr_scale(self.schedule, iteration) for hook in self.hooks)
        for group in self.optimizer.param_groups:
            group["lr"] *= lr_scale  # the scheduler sets it afresh after every step
        self.lr = self.optimizer.param_groups[0]["lr"]
        return path

    def finish(self, losses: Dict[str, float], grad_norm: Optional[float], num_microbatches: int) -> dict:
        """After the step: its metrics record, written to --metrics-file. ``losses``: the reported
        losses by Megatron's names ("lm loss", BERT's "sop loss"; floats or scalar tensors), reduced
        over microbatches and data-parallel ranks; empty off the last pipeline stage. ``grad_norm``:
        None where the optimizer skipped the step (fp16 overflow)."""
        path = self.path
        flops = self.flops(path.active)
        self.cumulative_flops += flops
        record = dict(
            iteration=path.iteration + 1, method=self.args.method, stage=path.stage, path_length=len(path.active),
            active_layers=list(path.active), lm_loss=_float(losses.get("lm loss")), lr=self.lr,
            grad_norm=_float(grad_norm), tokens=self.tokens_per_step, step_flops=flops,
            cumulative_flops=self.cumulative_flops,
        )
        if "sop loss" in losses:
            record["sop_loss"] = _float(losses["sop loss"])
        record.update(step_aux_losses(self.config, path.active, num_microbatches, keep=self.keep_moe_metrics))
        record["elapsed_s"] = time.perf_counter() - self._clock_start
        self.metrics.train(record)
        return record

    def evaluated_layers(self) -> List[int]:
        """Layers evaluation runs: all, unless the path applied last gates evaluation too (stacking's)."""
        if self.path is not None and self.path.gates_eval:
            return list(self.path.active)
        return list(range(1, self.config.num_layers + 1))

    def record_evaluation(self, iteration: int, loss: float, valid_set: Optional[str] = None) -> dict:
        """Writes the evaluation record of the model after ``iteration`` steps."""
        record = dict(iteration=iteration, method=self.args.method, val_loss=loss, val_ppl=perplexity(loss),
                      evaluated_layers=self.evaluated_layers())
        if valid_set is not None:
            record["valid_set"] = valid_set
        self.metrics.eval(record)
        return record


def _float(value) -> Optional[float]:
    return None if value is None else float(value)

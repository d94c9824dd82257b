"""The pretraining loop: Megatron-Core's schedules, one path per global step (RaPTr, gradual
stacking, progressive layer dropping or the full model: megatron_raptr/methods.py)."""

import itertools
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_raptr.hooks import StageHook, default_hooks
from megatron_raptr.runtime import StepRuntime
from megatron_raptr.sampler import Path
from megatron_raptr.training import checkpointing, data
from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.family import model_family
from megatron_raptr.training.initialize import current_device, initialize_distributed, megatron_fallbacks
from megatron_raptr.training.metrics import log, perplexity
from megatron_raptr.training.model import build_model, build_optimizer, transformer_config
from megatron_raptr.training.signals import ExitSignalHandler


@dataclass
class TrainState:
    """What a checkpoint must restore besides model, optimizer and LR schedule."""

    iteration: int = 0  # completed steps; the next step trains sampler.path(iteration)
    consumed_samples: int = 0
    cumulative_flops: float = 0.0
    elapsed_s: float = 0.0  # training time, carried across restarts


class TrainingStopped(RuntimeError):
    """Raised on every rank together, with the same message: the run cannot go on."""


def _mean_losses(losses: Sequence[dict]) -> Optional[Dict[str, float]]:
    """Each reported loss ("lm loss", BERT's "sop loss") averaged over microbatches and data-parallel
    ranks; None off the last pipeline stage."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    names = list(losses[0])
    means = torch.stack([torch.stack([item[name] for item in losses]).mean() for name in names])
    dist.all_reduce(means, group=parallel_state.get_data_parallel_group())
    return dict(zip(names, (means / parallel_state.get_data_parallel_world_size()).tolist()))


class Trainer:
    def __init__(self, args, config, model, optimizer, scheduler, hooks: List[StageHook]):
        self.args, self.config, self.model = args, config, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.family = model_family(args)
        # args.raptr: the run's schedule, whatever the method
        self.runtime = StepRuntime(args, args.raptr, config, model, optimizer, hooks,
                                   self.family.head_flops_per_token(args, config), args.tensorboard_dir)
        self.forward_backward = get_forward_backward_func()

    def schedule_kwargs(self, data_iterator, forward_only: bool) -> dict:
        if len(self.model) > 1:
            # The interleaved schedule reads the step's microbatches once per model chunk (virtual stage).
            # Each chunk reads all of them by the step's end, so nothing stays buffered between steps.
            data_iterator = list(itertools.tee(data_iterator, len(self.model)))
        return dict(
            forward_step_func=self.family.forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=self.args.num_microbatches, seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size, forward_only=forward_only,
        )

    def evaluated_model(self) -> str:
        """What evaluation runs, for the log."""
        layers = self.runtime.evaluated_layers()
        return "full model" if len(layers) == self.args.num_layers else f"layers {layers[0]}-{layers[-1]}"

    def train_step(self, state: TrainState, data_iterator) -> dict:
        path = self.runtime.start(state.iteration)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(**self.schedule_kwargs(data_iterator, forward_only=False))
        if self.args.check_for_nan_in_loss_and_grad:
            self._check_finite(losses, path)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        record = self.runtime.finish(_mean_losses(losses) or {}, grad_norm, self.args.num_microbatches)
        state.iteration += 1
        state.consumed_samples += self.args.global_batch_size
        state.cumulative_flops, state.elapsed_s = record["cumulative_flops"], record["elapsed_s"]
        return record

    def _check_finite(self, losses: Sequence[dict], path: Path) -> None:
        """Stops every rank, before the optimizer step, when any rank's loss or gradient is NaN or Inf.

        The loss exists on the last pipeline stage only, and with the distributed optimizer each
        rank holds its own shard of reduced gradients: every rank checks what it has, and one
        all-reduce over the world gives all of them the verdict, so all stop together.
        """
        bad = torch.zeros(2, device=current_device())
        if losses:
            bad[0] = ~torch.stack([item["lm loss"] for item in losses]).isfinite().all()
        # Under fp16, overflowing gradients are the loss scaler's business: the optimizer skips the step.
        if not self.args.fp16:
            # A sum is NaN or Inf if any element is, without a bool copy of the buffer.
            sums = [buffer.grad_data.sum() for chunk in self.model
                    for buffer in chunk.buffers + chunk.expert_parallel_buffers]
            bad[1] = ~torch.stack(sums).isfinite().all()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        found = [what for what, flag in zip(("loss", "gradients"), bad.tolist()) if flag]
        if found:
            raise TrainingStopped(
                f"NaN or Inf in the {' and '.join(found)} at iteration {path.iteration + 1} "
                f"(stage {path.stage}, path layers {list(path.active)}): stopped before the optimizer step, "
                "so no checkpoint holds this state. --no-check-for-nan-in-loss-and-grad trains on regardless."
            )

    @contextmanager
    def parameters_gathered(self):
        """With --overlap-param-gather the optimizer step leaves its all-gather to the next training
        forward's hooks; evaluation and checkpoints need the updated parameters now. As Megatron-LM:
        the hooks are off meanwhile, after one synchronous all-gather."""
        if not self.args.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    @torch.no_grad()
    def evaluate(self, valid_dataset) -> Optional[float]:
        """Validation loss of the full model (eval mode runs every layer, unscaled), or of the
        layers that exist so far under gradual stacking (its path gates evaluation too)."""
        with self.parameters_gathered():
            for chunk in self.model:
                chunk.eval()
            iterator = data.build_data_iterator(
                valid_dataset, self.args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(), consumed_samples=0, num_workers=self.args.num_workers,
            )
            losses = []
            for _ in range(self.args.eval_iters):
                losses.extend(self.forward_backward(**self.schedule_kwargs(iterator, forward_only=True)))
            for chunk in self.model:
                chunk.train()
        means = _mean_losses(losses)
        return None if means is None else means["lm loss"]

    def train(self, state: TrainState, train_dataset, valid_sets: dict,
              exit_signal: Optional[ExitSignalHandler] = None) -> Optional[float]:
        """Trains to --train-iters; returns the last validation loss of the first validation set.

        valid_sets: name -> dataset; the name is None for the one set of a run without
        --multiple-validation-sets (eval records then carry no valid_set field).
        """
        args = self.args
        data_iterator = data.build_data_iterator(
            train_dataset, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(), consumed_samples=state.consumed_samples,
            num_workers=args.num_workers,
        )
        for chunk in self.model:
            chunk.train()
        self.runtime.resume(state.iteration, state.cumulative_flops, state.elapsed_s)
        interval_start, interval_steps = time.perf_counter(), 0
        val_loss = None
        while state.iteration < args.train_iters:
            record = self.train_step(state, data_iterator)
            checkpointing.finalize_saves(blocking=False)  # commit a background save as soon as it is written
            interval_steps += 1
            if state.iteration % args.log_interval == 0:
                self._log_progress(record, (time.perf_counter() - interval_start) / interval_steps)
                interval_start, interval_steps = time.perf_counter(), 0
            if state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters:
                val_loss = self.evaluate_and_report(state, valid_sets)
            exiting = bool(args.exit_interval) and state.iteration % args.exit_interval == 0
            signalled = exit_signal is not None and exit_signal.received_on_any_rank()
            if args.save and (state.iteration == args.train_iters or exiting or signalled or
                              (args.save_interval and state.iteration % args.save_interval == 0)):
                self.save(state)
            if exiting or signalled:
                reason = "SIGTERM received" if signalled else f"--exit-interval {args.exit_interval}"
                log(f" exiting at iteration {state.iteration} ({reason})")
                break
        checkpointing.finalize_saves()  # before the process exits
        self.runtime.metrics.close()
        return val_loss

    def evaluate_and_report(self, state: TrainState, valid_sets: dict) -> Optional[float]:
        """Evaluates every validation set, records and prints each; returns the first one's loss."""
        losses = []
        for name, dataset in valid_sets.items():
            if dataset is None or self.args.eval_iters == 0:
                continue
            loss = self.evaluate(dataset)
            losses.append(loss)
            if loss is not None:
                self.runtime.record_evaluation(state.iteration, loss, name)
                log(f" validation ({self.evaluated_model()}){'' if name is None else ' on ' + name} at iteration "
                    f"{state.iteration} | lm loss: {loss:.6E} | lm loss PPL: {perplexity(loss):.6E}")
        return losses[0] if losses else None

    def save(self, state: TrainState) -> None:
        with self.parameters_gathered():
            checkpointing.save_checkpoint(
                self.args.save, state.iteration, self.model, self.optimizer, self.scheduler,
                dict(asdict(state), method_flags=self.args.method_flags, seed=self.args.seed,
                     adam_missed_steps=self.runtime.missed_steps.state_dict()),
                async_save=self.args.async_save, fully_parallel=self.args.ckpt_fully_parallel_save,
                optim_fully_reshardable=self.args.dist_ckpt_optim_fully_reshardable,
            )
        log(f" {'started saving' if self.args.async_save else 'saved'} checkpoint at iteration {state.iteration} "
            f"to {self.args.save}")

    def _log_progress(self, record: dict, seconds_per_step: float) -> None:
        args = self.args
        tflops = record["step_flops"] / seconds_per_step / args.world_size / 1e12
        eta = (args.train_iters - record["iteration"]) * seconds_per_step
        loss = "n/a" if record["lm_loss"] is None else f"{record['lm_loss']:.6E}"
        grad_norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
        log(
            f" iteration {record['iteration']:8d}/{args.train_iters:8d} |"
            f" consumed samples: {record['iteration'] * args.global_batch_size:12d} |"
            f" elapsed time per iteration (ms): {seconds_per_step * 1000:.1f} |"
            f" learning rate: {record['lr']:.6E} | lm loss: {loss} | grad norm: {grad_norm} |"
            f" stage: {record['stage']} | path length: {record['path_length']}/{args.num_layers} |"
            f" tokens/s: {self.runtime.tokens_per_step / seconds_per_step:.0f} |"
            f" TFLOP/s/rank (active layers): {tflops:.3f} | ETA: {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def build_trainer(args, hooks: Sequence[StageHook] = ()) -> Tuple[Trainer, object]:
    """The model, optimizer and LR schedule of parsed arguments in a Trainer; and the tokenizer.

    For tools and tests that drive the training step themselves (after initialize_distributed).
    """
    tokenizer = model_family(args).build_tokenizer(args)
    config = transformer_config(args)
    model = build_model(args, config)
    optimizer, scheduler = build_optimizer(args, config, model)
    return Trainer(args, config, model, optimizer, scheduler, list(hooks) + default_hooks(args)), tokenizer


def pretrain(argv: Optional[List[str]] = None, hooks: Optional[List[StageHook]] = None) -> Optional[float]:
    """Runs the whole job; returns the final full-model validation loss (on the last rank)."""
    args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    # Installed first, so that a SIGTERM during set-up also ends in a save after one step.
    with ExitSignalHandler() if args.exit_signal_handler else nullcontext() as exit_signal:
        return _pretrain(args, hooks, exit_signal)


def _pretrain(args, hooks: Optional[List[StageHook]], exit_signal: Optional[ExitSignalHandler]) -> Optional[float]:
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed,
                           args.distributed_timeout_minutes, args.expert_model_parallel_size,
                           args.expert_tensor_parallel_size, args.virtual_pipeline_model_parallel_size)
    try:
        data.check_token_ids(args)  # needs the process group: one rank reads the data
    except ValueError as error:
        raise TrainingStopped(str(error)) from None
    fallbacks = megatron_fallbacks(args.unfused)
    if fallbacks:
        log(f"Megatron-Core uses: {', '.join(fallbacks)}")
    trainer, tokenizer = build_trainer(args, hooks or [])
    if args.save and args.dist_ckpt_optim_fully_reshardable and args.use_distributed_optimizer:
        try:
            checkpointing.check_reshardable_buckets(trainer.model)  # before training, not at the first save
        except RuntimeError as error:
            raise TrainingStopped(str(error)) from None
    state = TrainState()
    if args.load:
        try:
            saved = checkpointing.load_checkpoint(args.load, trainer.model, trainer.optimizer, trainer.scheduler,
                                                  load_rng=not args.no_load_rng,
                                                  fully_parallel=args.ckpt_fully_parallel_load)
        except checkpointing.CheckpointMismatch as error:
            raise TrainingStopped(str(error)) from None
        if saved is not None:
            state = TrainState(**{key: saved[key] for key in asdict(state)})
            if "adam_missed_steps" in saved:  # else replayed from this run's paths
                trainer.runtime.missed_steps.load_state_dict(saved["adam_missed_steps"])
            log(f" loaded checkpoint from {args.load} at iteration {state.iteration}")
            if saved.get("method_flags") != args.method_flags:  # e.g. a RaPTr or stacking run finished in full
                log(f" note: the checkpoint was trained with {saved.get('method_flags') or 'the full model'}, "
                    f"this run trains with {args.method_flags or 'the full model'}")
    if args.multiple_validation_sets:
        train_dataset, valid_sets = data.build_with_validation_sets(args, tokenizer, trainer.family.build_datasets)
    else:
        train_dataset, valid_dataset = trainer.family.build_datasets(args, tokenizer)
        valid_sets = {None: valid_dataset}
    if args.skip_train:
        val_loss = trainer.evaluate_and_report(state, valid_sets)
        trainer.runtime.metrics.close()
        return val_loss
    log(trainer.runtime.plan(args.train_iters))
    val_loss = trainer.train(state, train_dataset, valid_sets, exit_signal)
    full = args.train_iters * trainer.runtime.flops(args.num_layers)
    log(f"final validation loss ({trainer.evaluated_model()}): {'n/a' if val_loss is None else f'{val_loss:.4f}'} | "
        f"FLOPs spent vs full training: {state.cumulative_flops / full:.3f}")
    return val_loss


def main() -> None:
    """pretrain_raptr.py: a TrainingStopped error is one line on stderr and exit status 1, no traceback."""
    try:
        pretrain()
    except TrainingStopped as error:
        if dist.get_rank() == dist.get_world_size() - 1:  # every rank has the same message
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)

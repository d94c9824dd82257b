"""RaPTr inside Megatron-LM's own training loop (`megatron.training`, megatron-core 0.17+).

What a Megatron-LM `pretrain_gpt.py` adds (see examples/pretrain_gpt_megatron_lm.py)::

    from megatron_raptr import megatron_lm as raptr

    args = parse_and_validate_args(extra_args_provider=raptr.add_arguments, ...)
    raptr.setup(args)                  # checks the flags, then hooks RaPTr into the loop
    model_cfg = gpt_config_from_args(args)
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), ...)

and on the command line the `--raptr-*` flags. `setup()` makes
`--spec megatron_raptr.megatron_lm gpt_layer_spec` the spec: the one Megatron-LM would build
for the flags (its own `default_layer_spec`, or the `--spec` given), every TransformerLayer
gated, nothing else changed. Without
`--raptr-schedule` every step trains the full model (the baseline, through the same code).

Megatron-LM's extension points carry the model and the flags: `--spec` builds the
gated layers, `extra_args_provider` adds the flags. Three things have none, and
`setup()` installs them by replacing names in Megatron-LM's modules, all in
`_install()`:

* the DDP class: `get_model` (`megatron.training.training.DDP`) and the model builder
  (`megatron.training.models.dist_utils.DistributedDataParallel`) construct it by
  module-level name; RaptrDistributedDataParallel reports skipped layers' parameters
  ready, without which `--overlap-grad-reduce` waits for them forever;
* `train_step`, which `train()` calls by module-level name, is wrapped: before it, the
  step's path is applied (a pure function of the iteration: every rank and pipeline
  stage agrees with no communication), stage hooks run and scale the learning rate
  (the optimizer is only reachable there); after it, the step's metrics record is
  written from the data-parallel-reduced loss and grad norm it returns;
* `evaluate` is wrapped to write the evaluation records.

And one for the PyPI wheel itself: `initialize_megatron` runs `make` on the dataset
helpers' source directory, which the wheel ships already compiled and without a
Makefile, so every pip-installed run would stop there; when the compiled helpers
import, compiling is skipped.
"""

import functools
import importlib.util
import inspect
import math
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.spec_utils import ModuleSpec, import_module

from megatron_raptr import megatron_internals as internals
from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.flops import schedule_flops_fraction, step_flops
from megatron_raptr.hooks import StageHook, default_hooks
from megatron_raptr.layer import PathSetter, check_gateable, raptr_decoder_spec
from megatron_raptr.layout import pipeline_layout
from megatron_raptr.moe import step_aux_losses
from megatron_raptr.optimizer_step import install_optimizer_step
from megatron_raptr.sampler import PathSampler
from megatron_raptr.sync import verify_path_sync
from megatron_raptr.training.arguments import _add_pld_args, _add_raptr_args, _add_stacking_args, build_schedule
from megatron_raptr.training.initialize import current_device
from megatron_raptr.training.metrics import MetricsWriter, perplexity
from megatron_raptr.unsupported import check_refused

SPEC = ("megatron_raptr.megatron_lm", "gpt_layer_spec")


def add_arguments(parser):
    """Megatron-LM's `extra_args_provider`: the --raptr-* flags and --metrics-file.

    Without CUDA it also adapts Megatron-LM to the CPU: its argument checks that follow
    already ask the GPU about itself.
    """
    if not torch.cuda.is_available():
        from megatron_raptr.compat import cpu

        cpu.install_megatron_training()
    _add_raptr_args(parser)
    _add_stacking_args(parser)  # known, so that they are refused by name (setup)
    _add_pld_args(parser)
    parser.add_argument_group("RaPTr metrics").add_argument(
        "--metrics-file", default=None,
        help="JSON lines of train and eval records (RaPTr path, loss, FLOPs), written by the last rank")
    return parser


def gpt_layer_spec(model_config, vp_stage: Optional[int] = None):
    """For `--spec megatron_raptr.megatron_lm gpt_layer_spec` (setup() makes it the default): the spec
    Megatron-LM would build for these flags, with every TransformerLayer gated by RaPTr.

    That is Megatron-LM's own `default_layer_spec` (dense or MoE block, qk-layernorm, MLA,
    heterogeneous, Transformer Engine or local, ...) or, where the command line gave another
    `--spec`, that one, which setup() kept as `args.raptr_base_spec`.
    """
    from megatron.training import get_args

    base = get_args().raptr_base_spec
    if base is None:
        spec, selected_by = internals.default_layer_spec(model_config, vp_stage), "Megatron-LM's default layer spec"
    else:
        spec, selected_by = _call_spec(import_module(base), model_config, vp_stage), f"--spec {' '.join(base)}"
    return raptr_decoder_spec(spec, model_config.transformer, vp_stage, selected_by)


def _call_spec(spec, model_config, vp_stage):
    """A --spec that is a function is called as Megatron-LM's GPTModelBuilder calls it."""
    if isinstance(spec, ModuleSpec) or not callable(spec):
        return spec
    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(model_config, vp_stage=vp_stage)
    return spec(model_config)


def setup(args, hooks: Sequence[StageHook] = ()) -> "RaptrLoop":
    """Checks the parsed Megatron-LM arguments and hooks RaPTr into Megatron-LM's loop.

    Call after `parse_and_validate_args` and before `gpt_config_from_args`/`pretrain`.
    Raises ValueError naming the flag for anything RaPTr cannot run, before any work.
    """
    if not torch.cuda.is_available():
        from megatron_raptr.compat import cpu

        cpu.adapt_megatron_training_args(args)
    _check_args(args)
    # gpt_config_from_args (after setup()) reads --spec; RaPTr's wraps the one given, if any.
    args.raptr_base_spec = _given_spec(args)
    args.spec = list(SPEC)
    loop = RaptrLoop(args, build_schedule(args), list(hooks) + default_hooks(args))
    _install(loop)
    return loop


def _check_args(args) -> None:
    check_refused(args)
    given = [flag for flag in ("stacking_schedule", "pld_theta", "pld_gamma") if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')}: in Megatron-LM's loop only RaPTr is supported yet; "
                         "gradual stacking and progressive layer dropping run with pretrain_raptr.py")
    if args.use_megatron_fsdp or args.use_torch_fsdp2:
        raise ValueError(
            "RaPTr does not run under --use-megatron-fsdp or --use-torch-fsdp2: a skipped layer's "
            "parameter shards would never be reduced or gathered. Use Megatron's DDP, with "
            "--use-distributed-optimizer to shard the optimizer state")
    if args.virtual_pipeline_model_parallel_size is not None:
        raise ValueError("RaPTr does not support virtual pipeline stages "
                         "(--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank)")
    if args.cuda_graph_impl != "none":  # --enable-cuda-graph and --external-cuda-graph set it too
        raise ValueError(f"RaPTr does not run under CUDA graphs (--cuda-graph-impl {args.cuda_graph_impl}; "
                         "--enable-cuda-graph and --external-cuda-graph set it too): a replayed graph runs the "
                         "layers it captured, whatever the step's path")
    if args.transformer_impl == "transformer_engine" and not gpt_layer_specs.HAVE_TE:
        raise ValueError("--transformer-impl transformer_engine (Megatron-LM's default) needs Transformer Engine, "
                         "which is not installed: pass --transformer-impl local")
    if args.train_iters is None:
        raise ValueError("RaPTr schedules are in iterations: use --train-iters, not --train-samples")
    if _given_spec(args) is not None:
        spec = import_module(args.spec)
        if isinstance(spec, ModuleSpec) or not callable(spec):  # a function's spec is checked when built
            check_gateable(spec, f"--spec {' '.join(args.spec)}")


def _given_spec(args) -> Optional[list]:
    """The --spec on the command line, unless it is RaPTr's own."""
    return args.spec if args.spec is not None and import_module(args.spec) is not gpt_layer_spec else None


class RaptrLoop:
    """The per-step RaPTr work inside Megatron-LM's train_step and evaluate."""

    def __init__(self, args, schedule, hooks: Sequence[StageHook]):
        self.args, self.schedule, self.hooks = args, schedule, list(hooks)
        self.sampler = None  # needs the model's pipeline layout: built at the first step
        self.set_path = None
        self.flops = None
        self.stage = None
        self.cumulative_flops = 0.0
        self.iteration = None  # completed steps, for evaluation records
        self.last_eval_iteration = None
        self.started = None
        self.metrics = None

    def _bind(self, model, optimizer, config) -> None:
        """Once, at the first step: the model Megatron-LM built, its optimizer and config."""
        args = self.args
        self.sampler = PathSampler(self.schedule, args.seed, pipeline_layout(config))
        self.set_path = PathSetter(model)
        install_optimizer_step(optimizer, model, args.raptr_skip_optimizer_step, self.sampler,
                               args.raptr_catch_up_weight_decay)
        tokens = args.global_batch_size * args.seq_length
        self.flops = functools.partial(step_flops, config, args.padded_vocab_size, args.seq_length, tokens)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.metrics = MetricsWriter(args.metrics_file, None, enabled=rank == world - 1)
        if rank == world - 1:
            fraction = schedule_flops_fraction(self.schedule, args.train_iters, config, args.padded_vocab_size,
                                               args.seq_length)
            print(f"{self.schedule.describe(args.train_iters)}\n"
                  f"  expected model FLOPs vs full training (output layer included): {fraction:.3f}", flush=True)
        self.started = time.perf_counter()

    def train_step(self, original, *args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        model, optimizer, config = (bound.arguments[name] for name in ("model", "optimizer", "config"))
        iteration = bound.arguments["iteration"]
        if self.sampler is None:
            self._bind(model, optimizer, config)
            # A resumed run's FLOPs so far: the path of every step is known from its iteration.
            self.cumulative_flops = sum(self.flops(self.sampler.path(t).active) for t in range(iteration))
        path = self.sampler.path(iteration)
        if path.stage != self.stage:
            self.stage = path.stage
            for hook in self.hooks:
                hook.on_stage_start(self.schedule, path.stage, iteration)
        if self.args.raptr_verify_sync and iteration % self.args.raptr_verify_sync == 0:
            verify_path_sync(path, current_device())
        self.set_path(path)
        lr_scale = math.prod(hook.lr_scale(self.schedule, iteration) for hook in self.hooks)
        for group in optimizer.param_groups:
            group["lr"] *= lr_scale  # the scheduler sets it afresh after the step
        lr = optimizer.param_groups[0]["lr"]

        result = original(*args, **kwargs)

        loss_dict, grad_norm = result[0], result[5]
        flops = self.flops(path.active)
        self.cumulative_flops += flops
        self.iteration = iteration + 1
        loss = loss_dict.get("lm loss")
        aux_losses = step_aux_losses(config, path.active, get_num_microbatches(), keep=True)
        self.metrics.train(dict(
            iteration=iteration + 1, stage=path.stage, path_length=len(path.active),
            active_layers=list(path.active), lm_loss=None if loss is None else float(loss), lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            tokens=self.args.global_batch_size * self.args.seq_length, step_flops=flops,
            cumulative_flops=self.cumulative_flops, **aux_losses, elapsed_s=time.perf_counter() - self.started,
        ))
        return result

    def evaluate(self, original, *args, **kwargs):
        result = original(*args, **kwargs)
        loss = result[0].get("lm loss") if result[0] else None
        iteration = self.iteration if self.iteration is not None else self.args.iteration
        # Megatron-LM evaluates again after training; one record per iteration.
        if loss is not None and self.metrics is not None and iteration != self.last_eval_iteration:
            self.last_eval_iteration = iteration
            self.metrics.eval(dict(iteration=iteration, val_loss=float(loss), val_ppl=perplexity(float(loss))))
        return result


class _RaptrDDPReducingEveryBucket(RaptrDistributedDataParallel):
    """--no-raptr-skip-grad-comm: Megatron-LM builds its DDP with Megatron's arguments only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, skip_idle_grad_comm=False, **kwargs)


_originals = {}


def _install(loop: RaptrLoop) -> None:
    """The one place that changes Megatron-LM: see the module docstring for why each name."""
    internals.check(internals.MEGATRON_LM)
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        internals.compile_helpers.replace(lambda: None)
    ddp_class = RaptrDistributedDataParallel if loop.args.raptr_skip_grad_comm else _RaptrDDPReducingEveryBucket
    internals.training_ddp.replace(ddp_class)
    internals.model_builder_ddp.replace(ddp_class)
    for internal in (internals.train_step, internals.evaluate):
        original = _originals.setdefault(internal.name, internal.get())
        internal.replace(functools.wraps(original)(functools.partial(getattr(loop, internal.attribute), original)))

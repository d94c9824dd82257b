"""RaPTr inside Megatron-LM's own training loop (`megatron.training`, megatron-core 0.17+).

What a Megatron-LM `pretrain_gpt.py` adds (see examples/pretrain_gpt_megatron_lm.py)::

    from megatron_raptr import megatron_lm as raptr

    args = parse_and_validate_args(extra_args_provider=raptr.add_arguments, ...)
    raptr.setup(args)                  # checks the flags, then hooks RaPTr into the loop
    model_cfg = gpt_config_from_args(args)
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), ...)

and on the command line the method's flags, as pretrain_raptr.py's: `--raptr-*` (RaPTr),
`--stacking-*` (gradual stacking) or `--pld-*` (progressive layer dropping). `setup()` makes
`--spec megatron_raptr.megatron_lm gpt_layer_spec` the spec: the one Megatron-LM would build
for the flags (its own `default_layer_spec`, or the `--spec` given), every TransformerLayer
gated, nothing else changed. Without a method's flags every step trains the full model
(the baseline, through the same code).

Megatron-LM's extension points carry the model and the flags: `--spec` builds the
gated layers, `extra_args_provider` adds the flags. Three things have none, and
`setup()` installs them by replacing names in Megatron-LM's modules, all in
`_install()`:

* the DDP class: `get_model` (`megatron.training.training.DDP`) and the model builder
  (`megatron.training.models.dist_utils.DistributedDataParallel`) construct it by
  module-level name; RaptrDistributedDataParallel reports skipped layers' parameters
  ready, without which `--overlap-grad-reduce` waits for them forever;
* `train_step`, which `train()` calls by module-level name, is wrapped in the per-step
  runtime that pretrain_raptr.py's trainer runs too (megatron_raptr/runtime.py; the model
  and optimizer are only reachable there): before it, the stage hooks (stacking's growth
  among them), the step's path and the learning-rate scale; after it, the step's metrics
  record, from the data-parallel-reduced loss and grad norm it returns;
* `evaluate` is wrapped to write the evaluation records.

And one for the PyPI wheel itself: `initialize_megatron` runs `make` on the dataset
helpers' source directory, which the wheel ships already compiled and without a
Makefile, so every pip-installed run would stop there; when the compiled helpers
import, compiling is skipped.
"""

import functools
import importlib.util
import inspect
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.spec_utils import ModuleSpec, import_module

from megatron_raptr import megatron_internals as internals
from megatron_raptr.ddp import RaptrDistributedDataParallel
from megatron_raptr.hooks import StageHook, default_hooks
from megatron_raptr.layer import check_gateable, raptr_decoder_spec
from megatron_raptr.runtime import StepRuntime
from megatron_raptr.training.arguments import _add_pld_args, _add_raptr_args, _add_stacking_args, build_schedule
from megatron_raptr.training.initialize import destroy_at_exit
from megatron_raptr.training.metrics import log
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
    _add_stacking_args(parser)
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
    destroy_at_exit()  # Megatron-LM leaves its process group to interpreter finalization
    return loop


def _check_args(args) -> None:
    check_refused(args)
    if args.transformer_impl == "transformer_engine" and not internals.gpt_specs_have_te.get():
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
    """The method's per-step work (megatron_raptr/runtime.py) around Megatron-LM's train_step and
    evaluate; the runtime is built at the first step, from the model and optimizer Megatron-LM built."""

    def __init__(self, args, schedule, hooks: Sequence[StageHook]):
        self.args, self.schedule, self.hooks = args, schedule, list(hooks)
        self.runtime: Optional[StepRuntime] = None
        self.last_eval_iteration = None

    def train_step(self, original, *args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        iteration = bound.arguments["iteration"]
        if self.runtime is None:
            model, optimizer, config = (bound.arguments[name] for name in ("model", "optimizer", "config"))
            self.runtime = StepRuntime(self.args, self.schedule, config, model, optimizer, self.hooks,
                                       keep_moe_metrics=True)
            self.runtime.resume(iteration)  # the FLOPs of a resumed run's earlier steps, from their paths
            log(self.runtime.plan(self.args.train_iters))
        self.runtime.start(iteration)
        result = original(*args, **kwargs)
        loss_dict, grad_norm = result[0], result[5]
        self.runtime.finish(loss_dict, grad_norm, get_num_microbatches())
        return result

    def evaluate(self, original, *args, **kwargs):
        result = original(*args, **kwargs)
        loss = result[0].get("lm loss") if result[0] else None
        if loss is None or self.runtime is None:  # no training step yet: nothing to record against
            return result
        iteration = self.runtime.path.iteration + 1  # the model after the step applied last
        # Megatron-LM evaluates again after training; one record per iteration.
        if iteration != self.last_eval_iteration:
            self.last_eval_iteration = iteration
            self.runtime.record_evaluation(iteration, float(loss))
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

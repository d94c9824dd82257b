"""Every private or undocumented Megatron-Core / Megatron-LM name megatron-raptr relies on.

Megatron renames or removes such names between releases without notice. Each one is listed
here with why we need it, and checked before use: that it exists and, for a function we call,
that it takes the parameters we pass. An unsupported megatron-core then fails at once, naming
the name, rather than deep inside a run. Call sites reach a name through its entry here
(call it, ``get()`` or ``replace()``); attributes of Megatron objects a call site already holds
(an optimizer's, a bucket group's) are used in place and only checked here.

Written for megatron-core 0.16.1 and 0.19.2. CORE is checked at import; the other groups are
names only some versions or setups have, checked where they are first needed.
"""

import importlib
import inspect
from typing import Optional, Sequence

SUPPORTED_VERSIONS = ("0.16.1", "0.19.2")


class Internal:
    """`path` (dotted attributes) inside module `module`; `params`: the parameters we pass it;
    `per_instance`: an attribute the class's objects set themselves, not the class."""

    def __init__(self, module: str, path: str, params: Sequence[str] = (), per_instance: bool = False):
        self.module, self.path, self.params, self.per_instance = module, path, tuple(params), per_instance
        self.name = f"{module}.{path}"

    def owner(self):
        owner = importlib.import_module(self.module)
        for part in self.path.split(".")[:-1]:
            owner = getattr(owner, part)
        return owner

    @property
    def attribute(self) -> str:
        return self.path.rpartition(".")[2]

    def get(self):
        return getattr(self.owner(), self.attribute)

    def replace(self, value) -> None:
        setattr(self.owner(), self.attribute, value)

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)

    def problem(self) -> Optional[str]:
        """What the installed Megatron lacks of this name, or None."""
        try:
            owner = self.owner()
        except (ImportError, AttributeError):
            return "missing"
        if self.per_instance:  # the class's own code still sets or reads it
            return None if self.attribute in _names_in_code(owner) else "missing"
        if not hasattr(owner, self.attribute):
            return "missing"
        if self.params:
            taken = inspect.signature(self.get()).parameters
            missing = [param for param in self.params if param not in taken]
            if missing:
                return f"takes no parameter {', '.join(missing)}"
        return None


def _names_in_code(cls: type) -> set:
    return {name for klass in cls.__mro__ for value in vars(klass).values() if inspect.isfunction(value)
            for name in value.__code__.co_names}


def installed_version() -> str:
    import megatron.core

    return megatron.core.__version__


def check(internals: Sequence[Internal]) -> None:
    """Raises ImportError naming each of `internals` the installed Megatron lacks."""
    problems = [f"{internal.name} ({problem})" for internal in internals if (problem := internal.problem())]
    if problems:
        raise ImportError(
            f"megatron-raptr relies on Megatron internals that megatron-core {installed_version()} does not "
            f"have: {'; '.join(problems)}. megatron-raptr was written for megatron-core "
            f"{' and '.join(SUPPORTED_VERSIONS)}.")


_DISTRIB = "megatron.core.optimizer.distrib_optimizer"
_BUFFER = "megatron.core.distributed.param_and_grad_buffer"
_DDP = "megatron.core.distributed.distributed_data_parallel"
_RANDOM = "megatron.core.tensor_parallel.random"

# DistributedOptimizer's per-parameter main weights and Adam state: growth copies them between
# layers, checkpoint loading creates them before there is any, torch's Adam fix replaces their setter.
get_model_param_range_map = Internal(_DISTRIB, "DistributedOptimizer._get_model_param_range_map", ["param"])
get_main_param_and_optimizer_states = Internal(
    _DISTRIB, "DistributedOptimizer._get_main_param_and_optimizer_states", ["model_param"])
set_main_param_and_optimizer_states = Internal(
    _DISTRIB, "DistributedOptimizer._set_main_param_and_optimizer_states", ["model_param", "tensors"])
init_optimizer_states_with_dummy_values = Internal(
    _DISTRIB, "DistributedOptimizer._init_optimizer_states_with_dummy_values")
# The optimizer's state the growth and the per-layer optimizer step find a parameter's state by.
OPTIMIZER_ATTRIBUTES = [
    Internal(_DISTRIB, f"DistributedOptimizer.{name}", per_instance=True)
    for name in ("model_param_gbuf_map", "model_param_group_index_map", "buffers", "data_parallel_group")
] + [Internal("megatron.core.optimizer.optimizer", f"Float16OptimizerWithFloat16Params.{name}", per_instance=True)
     for name in ("float16_groups", "fp32_from_float16_groups", "fp32_from_fp32_groups")
] + [Internal("megatron.core.optimizer.optimizer", "ChainedOptimizer.chained_optimizers", per_instance=True)]


def optimizers_of(optimizer) -> list:
    """The optimizers a ChainedOptimizer chains, each with its own state; [optimizer] for any other."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


# DDP's bucket groups, which RaptrDistributedDataParallel reports ready, skips and gathers itself.
DDP_ATTRIBUTES = [
    Internal(_DDP, f"DistributedDataParallel.{name}", per_instance=True)
    for name in ("bucket_groups", "expert_parallel_bucket_groups", "param_to_bucket_group", "buffers",
                 "expert_parallel_buffers", "force_all_reduce")
] + [Internal(_BUFFER, f"_ParamAndGradBucketGroup.{name}", per_instance=True)
     for name in ("params", "is_first_batch", "param_gather_handle", "param_gather_dispatched",
                  "next_param_gather_bucket_group")
] + [Internal(_BUFFER, f"_ParamAndGradBucketGroup.{name}", params) for name, params in (
    ("register_grad_ready", ["param", "force_all_reduce"]), ("start_grad_sync", ()),
    ("finish_grad_sync", ["force_all_reduce"]), ("start_param_sync", ["force_sync"]),
    ("finish_param_sync", ["skip_next_bucket_dispatch"]))
] + [Internal(_BUFFER, "_ParamAndGradBuffer.param_index_map", per_instance=True)]

# What Megatron picked for this machine, reported at start (and gradient-accumulation fusion refused
# where its linear layers would raise), and the norm the sequence-parallel check looks at.
grad_accum_fusion_available = Internal("megatron.core.tensor_parallel.layers", "_grad_accum_fusion_available")
fused_apply_rotary_pos_emb = Internal("megatron.core.models.common.embeddings.rope_utils",
                                      "fused_apply_rotary_pos_emb")
multi_tensor_applier = Internal("megatron.core.optimizer.optimizer", "multi_tensor_applier")
adam = Internal("megatron.core.optimizer", "Adam")
layer_norm_impl = Internal("megatron.core.transformer.transformer_block", "LayerNormImpl")
bert_lm_head_norm_impl = Internal("megatron.core.models.bert.bert_lm_head", "LNImpl")
# Whether Transformer Engine imported: the layer specs' default, and what the fallbacks report.
gpt_specs_have_te = Internal("megatron.core.models.gpt.gpt_layer_specs", "HAVE_TE")
bert_specs_have_te = Internal("megatron.core.models.bert.bert_layer_specs", "HAVE_TE")
gpt_specs_have_apex = Internal("megatron.core.models.gpt.gpt_layer_specs", "HAVE_APEX")

# Which layers are MoE, as Megatron reads --moe-layer-freq.
get_moe_layer_pattern = Internal("megatron.core.models.gpt.experimental_attention_variant_module_specs",
                                 "get_moe_layer_pattern", ["config"])

CORE = [get_model_param_range_map, get_main_param_and_optimizer_states, set_main_param_and_optimizer_states,
        init_optimizer_states_with_dummy_values, *OPTIMIZER_ATTRIBUTES, *DDP_ATTRIBUTES,
        grad_accum_fusion_available, fused_apply_rotary_pos_emb, multi_tensor_applier, adam, layer_norm_impl,
        bert_lm_head_norm_impl, gpt_specs_have_te, bert_specs_have_te, gpt_specs_have_apex, get_moe_layer_pattern]

# Megatron's own buffer layout, per transformer layer (ddp.per_layer_param_layout): where DDP takes
# a full_param_layout (0.17+).
group_params_for_buffers = Internal(_BUFFER, "group_params_for_buffers", ["params", "grad_reduce_in_fp32"])
compute_default_per_buffer_param_layout = Internal(
    _BUFFER, "_compute_default_per_buffer_param_layout", ["params", "bucket_size"])
compute_per_buffer_param_layout = Internal(
    _DISTRIB, "DistributedOptimizer._compute_per_buffer_param_layout",
    ["params", "bucket_size", "data_parallel_world_size", "ddp_config"])
PARAM_LAYOUT = [group_params_for_buffers, compute_default_per_buffer_param_layout, compute_per_buffer_param_layout]

# Without CUDA (compat/cpu.py): the RNG tracker and activation recompute on CPU generator states,
# and the functions that check for CUDA tensors, replaced where Megatron looks them up by name.
cuda_rng_states_tracker = Internal(_RANDOM, "CudaRNGStatesTracker")
model_parallel_rng_tracker_name = Internal(_RANDOM, "_MODEL_PARALLEL_RNG_TRACKER_NAME")
get_cuda_rng_state = Internal(_RANDOM, "_get_cuda_rng_state")
set_cuda_rng_state = Internal(_RANDOM, "_set_cuda_rng_state")
build_model_and_main_param_groups = Internal(_DISTRIB, "DistributedOptimizer._build_model_and_main_param_groups")
optimizer_clip_grad_by_total_norm_fp32 = Internal("megatron.core.optimizer.optimizer",
                                                  "clip_grad_by_total_norm_fp32")
exchange_by_distribution = Internal("megatron.core.dist_checkpointing.strategies.fully_parallel",
                                    "exchange_by_distribution")
maybe_move_tensor_to_cpu = Internal("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
                                    ["tensor", "as_numpy", "record_stream"])
# The pipeline's unbatched sends (the interleaved schedule's, overlapped with compute): made from a copy.
p2p_ops = Internal("megatron.core.pipeline_parallel.p2p_communication", "_p2p_ops",
                   ["tensor_send_prev", "tensor_send_next"])
CPU = [cuda_rng_states_tracker, model_parallel_rng_tracker_name, get_cuda_rng_state, set_cuda_rng_state,
       build_model_and_main_param_groups, optimizer_clip_grad_by_total_norm_fp32, exchange_by_distribution,
       maybe_move_tensor_to_cpu, p2p_ops]

# Megatron's MoE metrics tracker (0.19), read for each step's auxiliary losses.
get_moe_metrics_tracker = Internal("megatron.core.transformer.moe.moe_logging", "get_moe_metrics_tracker")
moe_metrics_tracker = Internal("megatron.core.transformer.moe.moe_logging", "MoEMetricsTracker")
MOE_TRACKER = [get_moe_metrics_tracker, moe_metrics_tracker,
               Internal("megatron.core.transformer.moe.moe_logging", "MoEMetricsTracker.metrics"),
               Internal("megatron.core.transformer.moe.moe_logging", "MoEMetricsTracker.report",
                        ["loss_scale", "iteration", "force_initialize", "track_names", "num_layers",
                         "moe_layer_freq", "total_loss_dict"])]

# Megatron-LM's loop (megatron.training, 0.17+), which has no extension point for these:
# megatron_lm.py replaces them by module-level name (see its docstring) and builds its default spec.
train_step = Internal("megatron.training.training", "train_step", ["model", "optimizer", "config", "iteration"])
evaluate = Internal("megatron.training.training", "evaluate")
training_ddp = Internal("megatron.training.training", "DDP")
model_builder_ddp = Internal("megatron.training.models.dist_utils", "DistributedDataParallel")
default_layer_spec = Internal("megatron.training.models.gpt", "default_layer_spec", ["config", "vp_stage"])
compile_helpers = Internal("megatron.core.datasets.utils", "compile_helpers")
# compat/cpu.py: its CUDA fusions' warm-up, run on a forked CPU generator.
jit_fusion_warm_up = Internal("megatron.training.training", "set_jit_fusion_options", ["tp_size"])
MEGATRON_LM = [train_step, evaluate, training_ddp, model_builder_ddp, default_layer_spec, compile_helpers,
               jit_fusion_warm_up]

REGISTRY = CORE + PARAM_LAYOUT + CPU + MOE_TRACKER + MEGATRON_LM

check(CORE)

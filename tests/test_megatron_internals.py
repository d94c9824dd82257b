"""megatron_internals: the one list of private or undocumented Megatron names, its checks, and
that no call site reaches such a name any other way."""

import importlib
import importlib.util
import pathlib
import tokenize

import pytest

from megatron_raptr import ddp, megatron_internals
from megatron_raptr.megatron_internals import Internal, check

ROOT = pathlib.Path(__file__).resolve().parent.parent

_DISTRIB = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
_OPTIMIZER = "megatron.core.optimizer.optimizer."
_DDP = "megatron.core.distributed.distributed_data_parallel.DistributedDataParallel."
_BUFFER = "megatron.core.distributed.param_and_grad_buffer."
_RANDOM = "megatron.core.tensor_parallel.random."
_MOE_LOGGING = "megatron.core.transformer.moe.moe_logging."

# Adding an internal means adding it here too: a deliberate, reviewed step.
EXPECTED = [
    _DISTRIB + "_get_model_param_range_map",
    _DISTRIB + "_get_main_param_and_optimizer_states",
    _DISTRIB + "_set_main_param_and_optimizer_states",
    _DISTRIB + "_init_optimizer_states_with_dummy_values",
    _DISTRIB + "model_param_gbuf_map",
    _DISTRIB + "model_param_group_index_map",
    _DISTRIB + "buffers",
    _DISTRIB + "data_parallel_group",
    _OPTIMIZER + "Float16OptimizerWithFloat16Params.float16_groups",
    _OPTIMIZER + "Float16OptimizerWithFloat16Params.fp32_from_float16_groups",
    _OPTIMIZER + "Float16OptimizerWithFloat16Params.fp32_from_fp32_groups",
    _OPTIMIZER + "ChainedOptimizer.chained_optimizers",
    _DDP + "bucket_groups",
    _DDP + "expert_parallel_bucket_groups",
    _DDP + "param_to_bucket_group",
    _DDP + "buffers",
    _DDP + "expert_parallel_buffers",
    _DDP + "force_all_reduce",
    _BUFFER + "_ParamAndGradBucketGroup.params",
    _BUFFER + "_ParamAndGradBucketGroup.is_first_batch",
    _BUFFER + "_ParamAndGradBucketGroup.param_gather_handle",
    _BUFFER + "_ParamAndGradBucketGroup.param_gather_dispatched",
    _BUFFER + "_ParamAndGradBucketGroup.next_param_gather_bucket_group",
    _BUFFER + "_ParamAndGradBucketGroup.register_grad_ready",
    _BUFFER + "_ParamAndGradBucketGroup.start_grad_sync",
    _BUFFER + "_ParamAndGradBucketGroup.finish_grad_sync",
    _BUFFER + "_ParamAndGradBucketGroup.start_param_sync",
    _BUFFER + "_ParamAndGradBucketGroup.finish_param_sync",
    _BUFFER + "_ParamAndGradBuffer.param_index_map",
    "megatron.core.tensor_parallel.layers._grad_accum_fusion_available",
    "megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb",
    _OPTIMIZER + "multi_tensor_applier",
    "megatron.core.optimizer.Adam",
    "megatron.core.transformer.transformer_block.LayerNormImpl",
    "megatron.core.models.bert.bert_lm_head.LNImpl",
    "megatron.core.models.gpt.gpt_layer_specs.HAVE_TE",
    "megatron.core.models.bert.bert_layer_specs.HAVE_TE",
    "megatron.core.models.gpt.gpt_layer_specs.HAVE_APEX",
    "megatron.core.models.gpt.experimental_attention_variant_module_specs.get_moe_layer_pattern",
    # PARAM_LAYOUT
    _BUFFER + "group_params_for_buffers",
    _BUFFER + "_compute_default_per_buffer_param_layout",
    _DISTRIB + "_compute_per_buffer_param_layout",
    # CPU
    _RANDOM + "CudaRNGStatesTracker",
    _RANDOM + "_MODEL_PARALLEL_RNG_TRACKER_NAME",
    _RANDOM + "_get_cuda_rng_state",
    _RANDOM + "_set_cuda_rng_state",
    _DISTRIB + "_build_model_and_main_param_groups",
    _OPTIMIZER + "clip_grad_by_total_norm_fp32",
    "megatron.core.dist_checkpointing.strategies.fully_parallel.exchange_by_distribution",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
    "megatron.core.pipeline_parallel.p2p_communication._p2p_ops",
    # MOE_TRACKER
    _MOE_LOGGING + "get_moe_metrics_tracker",
    _MOE_LOGGING + "MoEMetricsTracker",
    _MOE_LOGGING + "MoEMetricsTracker.metrics",
    _MOE_LOGGING + "MoEMetricsTracker.report",
    # MEGATRON_LM
    "megatron.training.training.train_step",
    "megatron.training.training.evaluate",
    "megatron.training.training.DDP",
    "megatron.training.models.dist_utils.DistributedDataParallel",
    "megatron.training.models.gpt.default_layer_spec",
    "megatron.core.datasets.utils.compile_helpers",
    "megatron.training.training.set_jit_fusion_options",
]

# The names call sites must reach through megatron_internals (distinctive enough to search for).
REACHED_THROUGH_THE_MODULE = [
    "_compute_per_buffer_param_layout", "_compute_default_per_buffer_param_layout", "group_params_for_buffers",
    "_get_model_param_range_map", "_get_main_param_and_optimizer_states", "_set_main_param_and_optimizer_states",
    "_init_optimizer_states_with_dummy_values", "_grad_accum_fusion_available", "fused_apply_rotary_pos_emb",
    "multi_tensor_applier", "LayerNormImpl", "LNImpl", "get_moe_layer_pattern", "CudaRNGStatesTracker",
    "_MODEL_PARALLEL_RNG_TRACKER_NAME", "_get_cuda_rng_state", "_set_cuda_rng_state",
    "_build_model_and_main_param_groups", "exchange_by_distribution", "maybe_move_tensor_to_cpu",
    "moe_logging", "get_moe_metrics_tracker", "MoEMetricsTracker", "default_layer_spec", "compile_helpers",
    "dist_utils", "_ParamAndGradBucketGroup", "_ParamAndGradBuffer", "set_jit_fusion_options", "_p2p_ops",
    "HAVE_TE", "HAVE_APEX",
]


def test_the_registry_lists_every_internal_once():
    names = [internal.name for internal in megatron_internals.REGISTRY]
    assert names == EXPECTED
    assert len(set(names)) == len(names)


def test_each_group_checks_where_the_installed_version_has_it():
    groups = {"CORE": True, "CPU": True, "PARAM_LAYOUT": ddp.TAKES_PARAM_LAYOUT,
              "MOE_TRACKER": importlib.util.find_spec("megatron.core.transformer.moe.moe_logging") is not None,
              "MEGATRON_LM": importlib.util.find_spec("megatron.training") is not None}
    for group, present in groups.items():
        if present:
            check(getattr(megatron_internals, group))
        else:  # megatron-core 0.16.1
            with pytest.raises(ImportError, match="written for megatron-core 0.16.1 and 0.19.2"):
                check(getattr(megatron_internals, group))


def test_import_fails_naming_a_missing_internal(monkeypatch):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    monkeypatch.delattr(DistributedOptimizer, "_get_model_param_range_map")
    with pytest.raises(ImportError) as error:
        importlib.reload(megatron_internals)
    monkeypatch.undo()
    importlib.reload(megatron_internals)
    message = str(error.value)
    assert f"{_DISTRIB}_get_model_param_range_map (missing)" in message
    assert f"megatron-core {megatron_internals.installed_version()} does not have" in message
    assert "written for megatron-core 0.16.1 and 0.19.2" in message


def test_a_changed_signature_or_instance_attribute_is_named():
    from megatron.core.transformer.moe import token_dispatcher

    renamed = Internal("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
                       ["tensor", "as_numpy", "to_numpy"])
    gone = Internal("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBucketGroup.no_such_attribute",
                    per_instance=True)
    assert renamed.get() is token_dispatcher.maybe_move_tensor_to_cpu
    with pytest.raises(ImportError, match=r"maybe_move_tensor_to_cpu \(takes no parameter to_numpy\); "
                                          r".*_ParamAndGradBucketGroup.no_such_attribute \(missing\)"):
        check([renamed, gone])


def _sources():
    return [ROOT / "pretrain_raptr.py", *sorted((ROOT / "megatron_raptr").rglob("*.py")),
            *sorted((ROOT / "tools").rglob("*.py"))]


def _reached_directly(path: pathlib.Path):
    """(line, name) for each name of REACHED_THROUGH_THE_MODULE in `path`'s code (not its comments or
    docstrings) other than as an attribute of megatron_internals: `internals.NAME`."""
    with tokenize.open(path) as source:
        tokens = [token for token in tokenize.generate_tokens(source.readline)
                  if token.type in (tokenize.NAME, tokenize.OP, tokenize.STRING)]
    for before, dot, token in zip([None, None] + tokens, [None] + tokens, tokens):
        name = token.string.strip("'\"") if token.type == tokenize.STRING else token.string
        if name not in REACHED_THROUGH_THE_MODULE:
            continue
        if dot is not None and dot.string == "." and before.string in ("internals", "megatron_internals"):
            continue
        yield token.start[0], name


def test_no_call_site_bypasses_the_module():
    bypasses = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in _sources()
                if path.name != "megatron_internals.py" for line, name in _reached_directly(path)]
    assert not bypasses, "use megatron_raptr.megatron_internals for:\n" + "\n".join(bypasses)


def test_the_bypass_search_finds_a_direct_use(tmp_path):
    source = tmp_path / "call_site.py"
    source.write_text('"""LayerNormImpl in a docstring is fine."""\n'
                      "x = internals.LayerNormImpl  # so is LayerNormImpl in a comment\n"
                      "y = transformer_block.LayerNormImpl\n"
                      'z = getattr(random, "_get_cuda_rng_state")\n')
    assert list(_reached_directly(source)) == [(3, "LayerNormImpl"), (4, "_get_cuda_rng_state")]

"""Spec fidelity in Megatron-LM's loop: with every layer on the path, RaPTr trains the model
Megatron-LM's own spec selection builds for the same flags (dense, SwiGLU + RMSNorm,
qk-layernorm, MoE), with RaptrTransformerLayer as the only difference.

One process (world size 1) runs Megatron-LM's `pretrain()` for one iteration per flag set,
first plainly (Megatron-LM's own `default_layer_spec`), then through
examples/pretrain_gpt_megatron_lm.py with RaPTr. Needs megatron.training (megatron-core 0.17+).
"""

import functools
import json
import runpy
import sys

import pytest

pytest.importorskip("megatron.training.training", reason="Megatron-LM's loop ships with megatron-core 0.17+")

from tests.distributed import run_distributed  # noqa: E402
from tests.test_megatron_lm import EXAMPLE  # noqa: E402

MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--micro-batch-size 2 --global-batch-size 2 --lr 1e-3 --train-iters 1 --eval-iters 0 --eval-interval 1 "
         "--hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 512 "
         "--seed 7 --num-workers 0").split()
# Megatron's experts fuse their routing weights into SwiGLU only, without biases (its MoE recipes' flags).
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--disable-bias-linear"]
FLAG_SETS = {
    "plain": [],
    "swiglu-rmsnorm": ["--swiglu", "--normalization", "RMSNorm"],
    "qk-layernorm": ["--qk-layernorm"],
    "moe-top2": MOE,
    "moe-layer-freq": [*MOE, "--moe-layer-freq", "([0,1]*2)"],
    # A --spec of the user's own (here Megatron-LM's default as a function) is gated, not replaced.
    "spec-given": ["--spec", "megatron.training.models.gpt", "default_layer_spec", "--qk-layernorm"],
}


def _probe_first_step(first_steps):
    """Wraps Megatron-LM's train_step to record, at each run's first step, the model it trains
    (module classes, initial weights) and the step's loss."""
    from megatron.training import training

    original = training.train_step

    @functools.wraps(original)
    def train_step(*args, **kwargs):
        model = kwargs.get("model", args[2])[0].module  # inside Megatron's DDP
        weights = {name: param.detach().clone() for name, param in model.named_parameters()}
        result = original(*args, **kwargs)
        first_steps.append(dict(modules=[(name, type(module).__name__) for name, module in model.named_modules()],
                                weights=weights, loss=float(result[0]["lm loss"])))
        return result

    training.train_step = train_step


def _megatron_lm(argv, example):
    """Megatron-LM's pretrain() on `example`'s datasets and forward step, without RaPTr."""
    from megatron.core.datasets import utils as dataset_utils
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_raptr.compat import cpu

    sys.argv = [EXAMPLE, *argv]
    dataset_utils.compile_helpers = lambda: None  # the wheel ships them compiled, without a Makefile
    cpu.install_megatron_training()  # what RaPTr's add_arguments and setup do on the CPU, and only that
    args = parse_and_validate_args()
    cpu.adapt_megatron_training_args(args)
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)), example["datasets_provider"],
             ModelType.encoder_or_decoder, example["forward_step"])


def _first_steps(flag_sets):
    """Per flag set: the first step of Megatron-LM's own run, then of the RaPTr run."""
    from megatron.training.training import destroy_global_state

    first_steps = []
    _probe_first_step(first_steps)
    example = runpy.run_path(EXAMPLE)
    runs = []
    # Megatron-LM's runs first: a RaPTr run installs its DDP and train_step for the process's lifetime.
    for raptr in (False, True):
        for flags in flag_sets:
            del first_steps[:]
            argv = [*MODEL, *flags]
            if raptr:
                sys.argv = [EXAMPLE, *argv]
                runpy.run_path(EXAMPLE, run_name="__main__")
            else:
                _megatron_lm(argv, example)
            destroy_global_state()
            runs.append(first_steps[0])
    return runs


def _heterogeneous(tmp_path):
    """Per-layer attention and MLP configs (a Nemotron-style block_configs file): layer 2 has no attention,
    layer 4 no MLP, layer 3 a narrower MLP; and the flags Megatron-LM requires to agree with the file."""
    def block(heads_in_group=2, ffn_mult=2.0):
        return {"attention": {"n_heads_in_group": heads_in_group, "no_op": heads_in_group is None,
                              "replace_with_linear": False},
                "ffn": {"ffn_mult": ffn_mult, "no_op": ffn_mult is None, "replace_with_linear": False}}

    path = tmp_path / "heterogeneous.json"
    path.write_text(json.dumps({
        "hidden_act": "silu", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
        "tie_word_embeddings": True, "rope_theta": 10000, "rope_scaling": {"factor": 8.0},
        "block_configs": [block(), block(heads_in_group=None), block(ffn_mult=1.0), block(ffn_mult=None)]}))
    return ["--heterogeneous-layers-config-path", str(path), "--swiglu", "--normalization", "RMSNorm",
            "--group-query-attention", "--num-query-groups", "2", "--position-embedding-type", "rope",
            "--use-rope-scaling", "--use-rotary-position-embeddings", "--rotary-base", "10000",
            "--rope-scaling-factor", "8"]


def test_raptr_trains_the_model_megatron_lm_builds(tmp_path):
    flag_sets = {**FLAG_SETS, "heterogeneous": _heterogeneous(tmp_path)}
    (runs,) = run_distributed(_first_steps, 1, list(flag_sets.values()), timeout_s=600)
    plain = {name: runs[i] for i, name in enumerate(flag_sets)}
    raptr = {name: runs[len(flag_sets) + i] for i, name in enumerate(flag_sets)}
    counts = {name: sum(w.numel() for w in run["weights"].values()) for name, run in plain.items()}
    # The flags change Megatron-LM's model: experts (more parameters), qk norms. (Multi-latent attention
    # has no local spec Megatron-Core can build: its DotProductAttention takes no k_channels.)
    assert counts["moe-top2"] > 1.5 * counts["plain"] and counts["qk-layernorm"] > counts["plain"]
    assert len({tuple(run["modules"]) for run in plain.values()}) == len(flag_sets) - 1
    assert plain["spec-given"]["modules"] == plain["qk-layernorm"]["modules"]
    for name in flag_sets:
        expected, got = plain[name], raptr[name]
        gated = [(module, "TransformerLayer" if cls == "RaptrTransformerLayer" else cls)
                 for module, cls in got["modules"]]
        assert gated == expected["modules"], name
        assert sum(cls == "RaptrTransformerLayer" for _, cls in got["modules"]) == 4, name
        assert list(got["weights"]) == list(expected["weights"]), name
        for weight, value in expected["weights"].items():
            assert got["weights"][weight].equal(value), (name, weight)  # same shapes and values, bit for bit
        assert got["loss"] == expected["loss"], name

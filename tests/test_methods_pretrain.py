"""Every method end to end through pretrain() on 1-2 CPU processes: gradual stacking and progressive
layer dropping resume exactly and continue under TP=2, PP=2 (also with virtual stages) and DP=2 (distributed optimizer, overlapped
gradient reduction); RaPTr and stacking checkpoints continue as full-model training; FLOPs follow the path.
All runs share two launches (one per world size), made once for the module."""

import types

import numpy as np
import pytest

from megatron_raptr.flops import step_flops
from megatron_raptr.training.arguments import parse_args
from tests.distributed import run_distributed
from tests.test_pretrain import MODEL, _pretrain_each, losses, records, train_records

STACKING = ["--stacking-schedule", "2@0,4@10", "--train-iters", "20", "--eval-interval", "5",
            "--stacking-optimizer-state", "copy", "--use-distributed-optimizer"]
PLD = ["--pld-theta", "0.5", "--pld-gamma", "0.2", "--train-iters", "8", "--use-distributed-optimizer"]
PLD_8_LAYERS = ["--num-layers", "8", "--pld-theta", "0.5", "--pld-gamma", "0.02", "--train-iters", "300",
                "--eval-interval", "1000", "--log-interval", "100"]
RAPTR_TO_FULL = ["--raptr-schedule", "2@0,4@0.5", "--train-iters", "8"]
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--raptr-verify-sync", "1"],
           "pp2": ["--pipeline-model-parallel-size", "2", "--raptr-verify-sync", "1"],
           # Layers 1 and 3 on rank 0, 2 and 4 on rank 1: growth copies across virtual stages.
           "vpp": ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
                   "--raptr-verify-sync", "1"],
           "dp2": ["--overlap-grad-reduce"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")

    def argv(name, *extra):
        return MODEL + ["--metrics-file", str(tmp / f"{name}.jsonl"), *extra]

    def ckpt(name):
        return str(tmp / name)

    run_distributed(_pretrain_each, 1, [
        argv("stacking", *STACKING),
        # Saved just before the boundary at 10, resumed across it, saved again, then finished in full.
        # Loaded under other layouts below: the distributed optimizer's state saved fully reshardable
        # (stacking-14, loaded under the same layout, has it per rank).
        argv("stacking-first-half", *STACKING, "--save", ckpt("stacking-10"), "--exit-interval", "10",
             "--dist-ckpt-optim-fully-reshardable"),
        argv("stacking-resumed", *STACKING, "--load", ckpt("stacking-10"), "--save", ckpt("stacking-14"),
             "--exit-interval", "14"),
        argv("stacking-then-full", "--train-iters", "20", "--eval-interval", "5", "--use-distributed-optimizer",
             "--load", ckpt("stacking-14")),
        argv("pld", *PLD),
        argv("pld-first-half", *PLD, "--save", ckpt("pld-4"), "--exit-interval", "4",
             "--dist-ckpt-optim-fully-reshardable"),
        argv("pld-resumed", *PLD, "--load", ckpt("pld-4")),
        argv("pld-8-layers", *PLD_8_LAYERS),
        argv("raptr", *RAPTR_TO_FULL),
        argv("raptr-first-6", *RAPTR_TO_FULL, "--save", ckpt("raptr-6"), "--exit-interval", "6"),
        argv("raptr-then-full", "--train-iters", "8", "--load", ckpt("raptr-6")),
    ])
    run_distributed(_pretrain_each, 2, [
        *[argv(f"stacking-{name}", *STACKING, *layout, "--load", ckpt("stacking-10"))
          for name, layout in LAYOUTS.items()],
        *[argv(f"pld-{name}", *PLD, *layout, "--load", ckpt("pld-4")) for name, layout in LAYOUTS.items()],
    ])
    return tmp


def test_stacking_trains_the_prefix_then_grows(runs):
    train = train_records(runs, "stacking")
    assert [r["active_layers"] for r in train] == [[1, 2]] * 10 + [[1, 2, 3, 4]] * 10
    assert [r["stage"] for r in train] == [0] * 10 + [1] * 10
    assert {r["method"] for r in train} == {"stacking"}
    evals = [r for r in records(runs, "stacking") if "val_loss" in r]
    assert [(r["iteration"], r["evaluated_layers"]) for r in evals] == \
        [(5, [1, 2]), (10, [1, 2]), (15, [1, 2, 3, 4]), (20, [1, 2, 3, 4])]


def test_stacking_resumes_exactly_across_the_boundary_and_finishes_as_full_model(runs):
    reference = train_records(runs, "stacking")
    assert losses(train_records(runs, "stacking-first-half")) == losses(reference[:10])
    resumed = train_records(runs, "stacking-resumed")
    assert [r["iteration"] for r in resumed] == [11, 12, 13, 14]
    assert [r["active_layers"] for r in resumed] == [[1, 2, 3, 4]] * 4
    assert losses(resumed) == losses(reference[10:14])
    # The last stage is the full model unscaled, so plain training continues the run exactly.
    then_full = train_records(runs, "stacking-then-full")
    assert {r["method"] for r in then_full} == {"baseline"}
    assert losses(then_full) == losses(reference[14:])
    assert then_full[-1]["cumulative_flops"] == reference[-1]["cumulative_flops"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stacking_continues_under_every_layout(runs, layout):
    reference = train_records(runs, "stacking")[10:]
    continued = train_records(runs, f"stacking-{layout}")
    assert [r["active_layers"] for r in continued] == [r["active_layers"] for r in reference]
    assert losses(continued) == pytest.approx(losses(reference), rel=2e-5)


def test_pld_resumes_exactly_and_continues_under_every_layout(runs):
    reference = train_records(runs, "pld")
    assert {r["method"] for r in reference} == {"pld"}
    assert len({tuple(r["active_layers"]) for r in reference}) > 1
    resumed = train_records(runs, "pld-resumed")
    assert [r["active_layers"] for r in resumed] == [r["active_layers"] for r in reference[4:]]
    assert losses(resumed) == losses(reference[4:])
    for layout in LAYOUTS:  # TP=2 and PP=2 also compared path checksums across ranks at every step
        continued = train_records(runs, f"pld-{layout}")
        assert [r["active_layers"] for r in continued] == [r["active_layers"] for r in reference[4:]], layout
        assert losses(continued) == pytest.approx(losses(reference[4:]), rel=2e-5), layout


def test_pld_paths_shrink_and_drop_deep_layers_more(runs):
    train = train_records(runs, "pld-8-layers")
    lengths = [r["path_length"] for r in train]
    assert np.mean(lengths[:30]) > np.mean(lengths[-100:]) + 1
    dropped = {layer: sum(layer not in r["active_layers"] for r in train) for layer in range(1, 9)}
    assert dropped[7] > dropped[2]
    assert all(record["path_length"] == len(record["active_layers"]) for record in train)


def test_raptr_checkpoint_finishes_as_full_model(runs):
    reference = train_records(runs, "raptr")
    then_full = train_records(runs, "raptr-then-full")
    assert [r["active_layers"] for r in then_full] == [[1, 2, 3, 4]] * 2
    assert losses(then_full) == losses(reference[6:])


def test_flops_follow_the_path_for_every_method(runs):
    config = types.SimpleNamespace(hidden_size=64, kv_channels=16, num_attention_heads=4, num_query_groups=None,
                                   gated_linear_unit=False, ffn_hidden_size=256, num_layers=8, num_moe_experts=None)
    names = ("stacking", "stacking-pp2", "pld", "pld-8-layers", "raptr", "raptr-then-full")
    train = [record for name in names for record in train_records(runs, name)]
    assert {r["path_length"] for r in train} >= {2, 3, 4, 5, 6, 7, 8}
    # NullTokenizer's vocabulary padded to a multiple of 128 (megatron-core 0.16 adds an
    # end-of-document id to --vocab-size 512, 0.19 counts it in); 8 x 32 tokens a step.
    vocab = parse_args(MODEL + ["--train-iters", "8"]).padded_vocab_size
    assert vocab in (512, 640)
    for record in train:
        assert record["step_flops"] == step_flops(config, vocab, 32, 256, len(record["active_layers"])), record

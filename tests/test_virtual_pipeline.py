"""Virtual pipeline stages (Megatron's interleaved schedule) with RaPTr: the layout, balanced paths per
virtual stage, and pretrain_raptr's loop under them, against the same run without them (from one
checkpoint: the layouts initialise their layers in different orders)."""

from collections import Counter

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from megatron_raptr.layout import PipelineLayout, pipeline_layout
from megatron_raptr.sampler import PathSampler
from megatron_raptr.schedule import RaptrSchedule
from megatron_raptr.training.arguments import parse_args
from tests.distributed import run_distributed
from tests.test_pretrain import MODEL, RAPTR, _pretrain_each, losses, train_records

VPP = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]


def test_layout_interleaves_virtual_stages_as_megatron_numbers_layers():
    """Chunk v * PP + r is rank r's virtual stage v (Megatron's get_transformer_layer_offset)."""
    def layout(pp, virtual, layers):
        return pipeline_layout(TransformerConfig(num_layers=layers, hidden_size=64, num_attention_heads=4,
                                                 pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                                 virtual_pipeline_model_parallel_size=virtual))

    assert layout(2, 2, 8) == PipelineLayout((2, 2, 2, 2), (0, 1, 0, 1), (0, 0, 1, 1))
    assert layout(4, 2, 16) == PipelineLayout((2,) * 8, (0, 1, 2, 3) * 2, (0,) * 4 + (1,) * 4)
    assert layout(4, 2, 16) == PipelineLayout.even(16, 4, 2)
    assert layout(2, None, 8) == PipelineLayout((4, 4), (0, 1), (0, 0))
    assert [layout(4, 2, 16).rank_of(layer) for layer in (1, 3, 8, 9, 16)] == [0, 1, 3, 0, 3]


# 16 layers, PP=4, 2 virtual stages of 2 layers: chunk c holds layers 2c+1, 2c+2 on rank c % 4.
INTERLEAVED = PipelineLayout.even(16, 4, 2)


def per_chunk_and_rank(active):
    chunks = Counter((layer - 1) // 2 for layer in active)
    ranks = Counter(chunk % 4 for chunk in chunks.elements())
    return [chunks[c] for c in range(8)], [ranks[r] for r in range(4)]


@pytest.mark.parametrize("length", [6, 9, 10, 12])
def test_pipeline_balanced_is_balanced_per_virtual_stage_and_per_rank(length):
    """First and last layer fixed: every virtual stage runs as many layers as the others up to one (two
    chunks hold a fixed layer), and the layers left over after an even split go to distinct ranks. Each
    layer is on the path as often as its keep probability says."""
    schedule = RaptrSchedule.parse(f"{length}@0", 16, 2000, sampling="pipeline-balanced")
    sampler = PathSampler(schedule, seed=3, layout=INTERLEAVED)
    counts = Counter()
    for t in range(2000):
        active = sampler.path(t).active
        counts.update(active)
        chunks, ranks = per_chunk_and_rank(active)
        assert len(active) == length
        assert max(chunks) - min(chunks) <= 1, (active, chunks)
        assert max(ranks) - min(ranks) <= 1, (active, ranks)
    keep = sampler.keep_probabilities(0)
    assert sum(keep.values()) == pytest.approx(length)
    for layer in range(1, 17):
        assert counts[layer] / 2000 == pytest.approx(keep[layer], abs=0.04), layer


def test_pipeline_balanced_follows_the_layout():
    """Paths of 8 of 16 layers balanced over 4 plain stages of 4 layers put 2 on each rank, often both in
    the same half of its layers; over the 8 chunks of 2 virtual stages, one in each, always."""
    schedule = RaptrSchedule.parse("8@0", 16, 200, sampling="pipeline-balanced")
    plain = PathSampler(schedule, seed=3, layout=(4, 4, 4, 4))
    interleaved = PathSampler(schedule, seed=3, layout=INTERLEAVED)
    assert sum(min(per_chunk_and_rank(plain.path(t).active)[0]) == 0 for t in range(200)) > 50
    assert all(per_chunk_and_rank(interleaved.path(t).active)[0] == [1] * 8 for t in range(200))


@pytest.mark.parametrize("flags, message", [
    (["--num-virtual-stages-per-pipeline-rank", "2"], "need --pipeline-model-parallel-size > 1"),
    (VPP[:2] + ["--num-layers-per-virtual-pipeline-stage", "3"], "--num-layers-per-virtual-pipeline-stage 3 does "
                                                                 "not divide the 2 layers"),
    (VPP[:2] + ["--num-virtual-stages-per-pipeline-rank", "3"], "--num-virtual-stages-per-pipeline-rank 3"),
    (VPP + ["--num-layers-per-virtual-pipeline-stage", "1"], "exclusive"),
    (VPP + ["--global-batch-size", "6"], "--global-batch-size 6: the interleaved pipeline schedule (virtual stages) "
                                         "needs a number of microbatches that is a multiple of "
                                         "--pipeline-model-parallel-size 2; it is 3"),
])
def test_bad_virtual_pipeline_flags_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(MODEL + ["--train-iters", "8", *flags], world_size=2)
    assert message in capsys.readouterr().err


def test_virtual_pipeline_flags_set_the_virtual_size():
    assert parse_args(MODEL + ["--train-iters", "8", *VPP], world_size=2).virtual_pipeline_model_parallel_size == 2
    per_stage = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    assert parse_args(MODEL + ["--train-iters", "8", *per_stage], world_size=2).virtual_pipeline_model_parallel_size == 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process trains 8 iterations (saving at 4); two continue from iteration 4 under PP=2 with virtual
    stages, then from a checkpoint saved under them, with and without them."""
    tmp = tmp_path_factory.mktemp("vpp")
    common = MODEL + RAPTR + ["--train-iters", "8", "--raptr-verify-sync", "1"]
    ckpt, vpp_ckpt = str(tmp / "ckpt"), str(tmp / "vpp-ckpt")
    # Layers 1 and 4 only: rank 1's first virtual stage (layer 2) and rank 0's second (layer 3) run none.
    idle = ["--raptr-schedule", "2@0", "--raptr-fixed-layers", "1", "4", "--train-iters", "6"]

    def argv(name, *extra):
        return common + ["--metrics-file", str(tmp / f"{name}.jsonl"), *extra]

    run_distributed(_pretrain_each, 1, [
        argv("uninterrupted"),
        argv("first-half", "--save", ckpt, "--exit-interval", "4"),
        argv("idle", "--load", ckpt, *idle),
    ])
    run_distributed(_pretrain_each, 2, [
        argv("vpp", "--load", ckpt, *VPP),
        argv("vpp-to-6", "--load", ckpt, *VPP, "--save", vpp_ckpt, "--exit-interval", "6"),
        argv("vpp-resumed", "--load", vpp_ckpt, *VPP),
        argv("pp2-from-vpp", "--load", vpp_ckpt, "--pipeline-model-parallel-size", "2"),
        argv("vpp-idle", "--load", ckpt, *VPP, *idle, "--recompute-granularity", "full"),
        argv("vpp-balanced", "--num-layers", "8", "--raptr-schedule", "4@0", "--raptr-sampling", "pipeline-balanced",
             "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"),
    ])
    return tmp


def test_virtual_stages_train_as_one_process(runs):
    """(And as plain PP=2: the reshard test below.)"""
    reference = train_records(runs, "uninterrupted")[4:]
    continued = train_records(runs, "vpp")
    assert [r["iteration"] for r in continued] == [5, 6, 7, 8]
    assert [r["active_layers"] for r in continued] == [r["active_layers"] for r in reference]
    assert losses(continued) == pytest.approx(losses(reference), rel=2e-5)


def test_virtual_stage_checkpoint_resumes_exactly_and_reshards_to_plain_pipeline(runs):
    """Saved under virtual stages at 6: resumed under them, the run repeats bit for bit; loaded under
    plain PP=2, it continues within rounding."""
    vpp = train_records(runs, "vpp")
    assert losses(train_records(runs, "vpp-to-6")) == losses(vpp[:2])
    for name in ("vpp-resumed", "pp2-from-vpp"):
        resumed = train_records(runs, name)
        assert [r["iteration"] for r in resumed] == [7, 8], name
        assert [r["active_layers"] for r in resumed] == [r["active_layers"] for r in vpp[2:]], name
        assert [r["cumulative_flops"] for r in resumed] == [r["cumulative_flops"] for r in vpp[2:]], name
    assert losses(train_records(runs, "vpp-resumed")) == losses(vpp[2:])
    assert losses(train_records(runs, "pp2-from-vpp")) == pytest.approx(losses(vpp[2:]), rel=2e-5)


def test_virtual_stage_without_active_layer_passes_its_input_on(runs):
    """Two of the four virtual stages run no layer, with freed pipeline outputs and full recompute."""
    piped = train_records(runs, "vpp-idle")
    assert [r["active_layers"] for r in piped] == [[1, 4]] * 2
    assert losses(piped) == pytest.approx(losses(train_records(runs, "idle")), rel=2e-5)


def test_pipeline_balanced_runs_one_layer_in_each_virtual_stage(runs):
    """8 layers, PP=2, virtual stages of 2 layers, paths of 4 (layers 1 and 8 fixed): one layer per stage."""
    train = train_records(runs, "vpp-balanced")
    assert len({tuple(r["active_layers"]) for r in train}) > 1
    for record in train:
        assert sorted((layer - 1) // 2 for layer in record["active_layers"]) == [0, 1, 2, 3], record
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]

"""Megatron-Core trains on the CPU over gloo under TP=2, PP=2 and DP=2.

One 2-rank job runs every layout (importing megatron.core costs each process ~10 s,
so the layouts share one pair of processes). The ranks first train a TP=1/PP=1
reference on the whole global batch: the two data-parallel replicas then reduce
identical gradients, so this is exactly a single-rank run. Then they train each
layout from the reference's initial weights (sharded) on the same global batch,
and each must reproduce the reference's losses step by step.
"""
import pytest
import torch

from tests.distributed import run_distributed

STEPS = 3
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)

# name: (TP, PP, DDP options, position embedding, TransformerConfig overrides)
LAYOUTS = {
    "tp2": (2, 1, {}, "rope", {}),
    "tp2 activation-recompute": (2, 1, {}, "rope", RECOMPUTE),
    # 4 microbatches on 2 stages: 1F1B runs warm-up, steady state and cool-down.
    "pp2": (1, 2, {}, "learned_absolute", {}),
    # Stages exchange activation shapes before each transfer. (TransformerConfig
    # rejects it with the default MoE dispatcher, even without experts.)
    "pp2 variable-seq-lengths": (
        1, 2, {}, "learned_absolute",
        dict(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall"),
    ),
    "pp2 bf16": (1, 2, {}, "learned_absolute", dict(bf16=True, params_dtype=torch.bfloat16)),
    "dp2 distributed-optimizer overlap-grad-reduce": (
        1, 1, dict(use_distributed_optimizer=True, overlap_grad_reduce=True),
        "learned_absolute", {},
    ),
}


def _rng_streams():
    """Draws inside a fork of Megatron's model-parallel RNG stream, and whether the
    fork left the default generator as it was."""
    from megatron.core import tensor_parallel

    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(2).tolist()
    return inside, torch.equal(before, torch.get_rng_state())


def _job():
    """Returns the rejected-layout error, RNG draws under TP=1 and TP=2, the reference
    losses per position embedding and each layout's losses (None off the last
    pipeline stage)."""
    from megatron.core import parallel_state

    from megatron_raptr.training.initialize import initialize_distributed
    from tests import tiny_gpt

    with pytest.raises(ValueError) as rejected:
        initialize_distributed(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)

    rng = {}
    for tp in (1, 2):
        initialize_distributed(tp)
        rng[tp] = _rng_streams()
        parallel_state.destroy_model_parallel()

    batch = tiny_gpt.global_batch()
    initial, reference = {}, {}
    for embedding in sorted({layout[3] for layout in LAYOUTS.values()}):
        initialize_distributed()
        model, config = tiny_gpt.build_gpt(embedding)
        initial[embedding] = {name: p.detach().clone() for name, p in model.named_parameters()}
        ddp, optimizer = tiny_gpt.wrap(model, config)
        reference[embedding] = tiny_gpt.train(ddp, optimizer, config, batch, STEPS)
        parallel_state.destroy_model_parallel()

    losses = {}
    for name, (tp, pp, ddp_options, embedding, overrides) in LAYOUTS.items():
        try:
            initialize_distributed(tp, pp)
            model, config = tiny_gpt.build_gpt(embedding, **overrides)
            tiny_gpt.load_full_state(model, initial[embedding])
            ddp, optimizer = tiny_gpt.wrap(model, config, **ddp_options)
            dp_rank = parallel_state.get_data_parallel_rank()
            local = batch.chunk(parallel_state.get_data_parallel_world_size())[dp_rank]
            losses[name] = tiny_gpt.train(ddp, optimizer, config, local, STEPS)
            parallel_state.destroy_model_parallel()
        except Exception as error:
            raise RuntimeError(f"layout {name!r} failed") from error
    return str(rejected.value), rng, reference, losses


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_job, 2)


def test_rejects_layout_larger_than_world(ranks):
    for message, _, _, _ in ranks:
        assert "--tensor-model-parallel-size" in message
        assert "--pipeline-model-parallel-size" in message


def test_model_parallel_rng_stream_per_tensor_parallel_rank(ranks):
    (tp1_rank0, tp2_rank0), (tp1_rank1, tp2_rank1) = (
        (rng[1], rng[2]) for _, rng, _, _ in ranks
    )
    # Data-parallel replicas share the stream; tensor-parallel ranks get their own.
    assert tp1_rank0[0] == tp1_rank1[0]
    assert tp2_rank0[0] != tp2_rank1[0]
    # A fork leaves the default generator (dropout outside TP regions, data) alone.
    assert all(untouched for _, untouched in (tp1_rank0, tp1_rank1, tp2_rank0, tp2_rank1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_single_rank_training(ranks, layout):
    # fp32 reproduces the reference up to rounding; bf16 only to its precision.
    tolerance = 0.02 if "bf16" in layout else 1e-5
    for rank, (_, _, reference, losses) in enumerate(ranks):
        if losses[layout] is None:  # not the last pipeline stage
            continue
        reference = reference[LAYOUTS[layout][3]]
        assert all(a > b for a, b in zip(reference, reference[1:])), reference
        assert losses[layout] == pytest.approx(reference, abs=tolerance), f"rank {rank}"
    assert any(losses[layout] is not None for _, _, _, losses in ranks)

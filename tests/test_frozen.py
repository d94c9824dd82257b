"""--raptr-skip-optimizer-step: layers off the path keep their weights and Adam state, and their
bucket groups are not all-gathered; a run resumed from a checkpoint repeats the uninterrupted one.

One 2-rank gloo job (DP=2) trains a tiny RaPTr GPT from the same weights under each optimizer
Megatron builds (fp32, bf16 with fp32 main weights, distributed), each with and without skipping
the step; and with the distributed optimizer, overlapped reduction and overlapped (or not)
parameter all-gather, recording every all-gather by the bucket group it fills. A second job
resumes pretrain_raptr runs with the flag.
"""
import pytest

from tests.distributed import run_distributed
from tests.test_pretrain import MODEL, _pretrain_each, losses, train_records

OPTIMIZERS = {"fp32": dict(), "bf16": dict(bf16=True), "distopt": dict(use_distributed_optimizer=True),
              "distopt-bf16": dict(use_distributed_optimizer=True, bf16=True)}
FROZEN_STEP = [(1, 2, 3, 4), (1, 3)]  # every layer gets Adam state, then layers 2 and 4 are skipped
GATHER_PATHS = [(1, 3), (2, 3), (4,), (4,), (1, 2, 3, 4), (2,)]  # active layers of each step, of 4


def _layer(name):
    """1-based layer number of a GPT parameter name, None outside the transformer layers."""
    parts = name.split(".")
    return int(parts[2]) + 1 if parts[:2] == ["decoder", "layers"] else None


def _build(initial, options, skip_step, **wrap_kwargs):
    import torch

    from megatron_raptr import PathSetter, RaptrDistributedDataParallel, get_gpt_raptr_layer_spec
    from megatron_raptr.optimizer_step import install_optimizer_step
    from tests import tiny_gpt

    config_options = {"bf16": True} if options.get("bf16") else {}
    model, config = tiny_gpt.build_gpt(layer_spec=get_gpt_raptr_layer_spec(), **config_options)
    with torch.no_grad():
        for param, value in zip(model.parameters(), initial):
            param.copy_(value)
    ddp, optimizer = tiny_gpt.wrap(model, config, ddp_class=RaptrDistributedDataParallel,
                                   use_distributed_optimizer=options.get("use_distributed_optimizer", False),
                                   **wrap_kwargs)
    install_optimizer_step(optimizer, [ddp], skip_off_path=skip_step)
    return model, ddp, optimizer, config, PathSetter(ddp)


def _snapshot(model, optimizer):
    """Each named parameter's value and its Adam state (this rank's shard under the distributed optimizer)."""
    from megatron_raptr.optimizer_step import main_parameters

    main = {}
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        main.update({param: (leaf.optimizer, value) for param, value in main_parameters(leaf).items()})
    snapshot = {}
    for name, param in model.named_parameters():
        inner, value = main.get(param, (None, None))
        state = {key: tensor.clone() for key, tensor in inner.state[value].items()} if inner else {}
        snapshot[name] = (param.detach().clone(), state)
    return snapshot


def _frozen_step(initial, batch, options, skip_step):
    """Snapshots after each step of FROZEN_STEP."""
    from megatron_raptr.sampler import Path
    from tests import tiny_gpt

    model, ddp, optimizer, config, set_path = _build(initial, options, skip_step)
    snapshots = []

    def before_step(step):
        if step:
            snapshots.append(_snapshot(model, optimizer))
        set_path(Path(step, 0, FROZEN_STEP[step], {}))

    tiny_gpt.train(ddp, optimizer, config, batch, len(FROZEN_STEP), before_step)
    return snapshots + [_snapshot(model, optimizer)]


def _gathers(initial, batch, skip_step, overlap_param_gather):
    """Per-step sets of all-gathered bucket groups and of bucket groups with a parameter on the
    path, the losses and the final (gathered) parameters."""
    import torch
    from megatron.core.distributed import param_and_grad_buffer

    from megatron_raptr.sampler import Path
    from tests import tiny_gpt

    model, ddp, optimizer, config, set_path = _build(
        initial, {"use_distributed_optimizer": True}, skip_step, overlap_grad_reduce=True,
        overlap_param_gather=overlap_param_gather, bucket_size=1)
    groups = ddp.bucket_groups
    group_of = {bucket.param_data.data_ptr(): i for i, g in enumerate(groups) for bucket in g.buckets}
    gathered, on_path = [], []

    def before_step(step):
        gathered.append(set())
        set_path(Path(step, 0, GATHER_PATHS[step], {}))  # overlapped: gathers for this step start here
        skipped = set(ddp.skipped_parameters)
        on_path.append({i for i, g in enumerate(groups) if not g.params <= skipped})

    def recorded(*args, **kwargs):
        gathered[-1].add(group_of[args[0].data_ptr()])
        return all_gather(*args, **kwargs)

    all_gather = param_and_grad_buffer.dist_all_gather_func
    param_and_grad_buffer.dist_all_gather_func = recorded
    try:
        losses = tiny_gpt.train(ddp, optimizer, config, batch, len(GATHER_PATHS), before_step)
    finally:
        param_and_grad_buffer.dist_all_gather_func = all_gather
    ddp.start_param_sync(force_sync=True)  # what an evaluation or checkpoint would gather first
    return gathered, on_path, len(groups), losses, [p.detach().clone() for p in model.parameters()]


def _job():
    from tests import tiny_gpt

    initial, batch = tiny_gpt.raptr_start()
    frozen = {name: {skip: _frozen_step(initial, batch, options, skip) for skip in (True, False)}
              for name, options in OPTIMIZERS.items()}
    gathers = {(skip, overlap): _gathers(initial, batch, skip, overlap) for skip in (True, False)
               for overlap in (False, True)}
    return frozen, gathers


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_job, 2)


def _same(a, b):
    """Whether two snapshots of a parameter hold the same value and Adam state, its step aside (under
    the distributed optimizer, of this rank's shard)."""
    import torch

    (value_a, state_a), (value_b, state_b) = a, b
    return (torch.equal(value_a, value_b) and state_a.keys() == state_b.keys()
            and all(torch.equal(state_a[key], state_b[key]) for key in state_a if key != "step"))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_skipped_layers_keep_weights_and_adam_state_active_layers_step_as_before(ranks, optimizer):
    import torch

    for frozen, _ in ranks:
        (before, after), (_, default) = frozen[optimizer][True], frozen[optimizer][False]
        stepped = {name for name in after if _layer(name) in FROZEN_STEP[1] or _layer(name) is None}
        shared_step = {float(state["step"]) for _, state in after.values() if "step" in state}
        assert len(shared_step) <= 1  # one step count, as Megatron's checkpoints hold it
        for name in after:
            # Independent check of the stepped ones: the default mode's step from the same state.
            assert _same(after[name], default[name] if name in stepped else before[name]), name
        # The checks can fail: a step changes (this rank's shard of) some value or state, and the
        # default mode's momentum and weight decay move the skipped layers.
        assert not all(_same(after[name], before[name]) for name in stepped)
        assert not all(_same(default[name], before[name]) for name in after if name not in stepped)


@pytest.mark.parametrize("overlap_param_gather", [False, True], ids=["gather-after-step", "gather-in-forward"])
def test_groups_the_step_left_unchanged_are_not_gathered_and_nothing_else_changes(ranks, overlap_param_gather):
    import torch

    for _, gathers in ranks:
        gathered, on_path, num_groups, losses, params = gathers[True, overlap_param_gather]
        # Changed by step s: the groups on its path. Gathered after the step, or before and during the
        # next forward (the first forward gathers every group).
        expected = on_path if not overlap_param_gather else [set(range(num_groups))] + on_path[:-1]
        assert gathered == expected
        assert [len(e) < num_groups for e in on_path] == [len(p) < 4 for p in GATHER_PATHS]
        same_without_overlap = gathers[True, False]
        assert losses == same_without_overlap[3]
        assert all(torch.equal(a, b) for a, b in zip(params, same_without_overlap[4]))
        # Without the flag every group is gathered every step, overlapped or not, with equal results.
        default = gathers[False, overlap_param_gather]
        assert default[0] == [set(range(num_groups))] * len(GATHER_PATHS)
        assert default[3] == gathers[False, False][3]
        assert all(torch.equal(a, b) for a, b in zip(default[4], gathers[False, False][4]))
        assert losses != default[3]


FLAG = ["--raptr-schedule", "2@0,3@0.5", "--raptr-sampling", "fixed-size", "--raptr-skip-optimizer-step",
        "--train-iters", "8"]
RESUMED = {"adam": [], "distributed-adam": ["--use-distributed-optimizer", "--overlap-grad-reduce"]}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frozen")
    argvs = []
    for name, extra in RESUMED.items():
        def argv(run, *more):
            return MODEL + FLAG + extra + ["--metrics-file", str(tmp / f"{name}-{run}.jsonl"), *more]

        argvs += [argv("whole"), argv("first", "--save", tmp / name, "--exit-interval", "3"),
                  argv("resumed", "--load", tmp / name)]
    run_distributed(_pretrain_each, 2, [[str(a) for a in argv] for argv in argvs])
    return tmp


@pytest.mark.parametrize("optimizer", RESUMED)
def test_resumed_run_repeats_the_uninterrupted_one(resumed, optimizer):
    whole = train_records(resumed, f"{optimizer}-whole")
    assert losses(train_records(resumed, f"{optimizer}-first")) == losses(whole[:3])
    assert [r["iteration"] for r in train_records(resumed, f"{optimizer}-resumed")] == list(range(4, 9))
    assert losses(train_records(resumed, f"{optimizer}-resumed")) == losses(whole[3:])

"""Checkpoints resume training exactly, under any TP/PP/DP layout.

One two-rank job, per optimizer (Adam, distributed Adam): a TP=1/PP=1/DP=2 reference
trains two steps, saves (in the default format; asynchronously; for distributed Adam also
fully reshardable), records its RNG draws and trains three more steps while the
asynchronous save is written. Then, for each case, the ranks build the model from another
seed, load and train those three steps again. Each loss is computed before its step's update: the first resumed loss
checks the weights, the second the Adam state and the saved learning rate, the third
the LR schedule (still warming up). The tokenizer is a SentencePiece model of 600
pieces, which Megatron-LM's padding makes 640 rows under TP=1 and 768 under TP=2: the
resumed runs keep the checkpoint's 640. The job also checks an interrupted save and the
load errors; the tests below assert on what it returns.

Megatron-Core is imported inside the ranks only (see test_cpu_compat.py).
"""
import os

import pytest

from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.tokenizer import train_sentencepiece
from tests.distributed import run_distributed
from tests.documents import stdlib_documents

ARGV = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 1 --global-batch-size 4 --train-iters 8 --lr 1e-3 --lr-warmup-iters 3 "
    "--hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type SentencePieceTokenizer"
).split()
SENTENCEPIECE_VOCAB = 600
OPTIMIZERS = {"adam": [], "distributed-adam": ["--use-distributed-optimizer"]}
# Resumed cases: (TP, PP), DP = 2 / (TP x PP); "async" loads the asynchronous save.
CASES = {"same": (1, 1), "async": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
RESUMED_STEPS = 3
SAVED = dict(iteration=2, consumed_samples=8, raptr_schedule="2@0,4@0.5", seed=1234)


def _argv(root, *extra):
    return ARGV + ["--tokenizer-model", os.path.join(root, "spm.model"), *extra]


def _build(root, optimizer, tp, pp, seed, extra=()):
    """Built as pretrain() builds it, with `extra` flags; ("--load", DIR) sizes the vocabulary as that
    checkpoint's."""
    from megatron.core import parallel_state

    from megatron_raptr.training.arguments import parse_args
    from megatron_raptr.training.initialize import initialize_distributed
    from megatron_raptr.training.model import build_model, build_optimizer, transformer_config

    argv = _argv(root, *OPTIMIZERS[optimizer], *extra)
    argv += ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    args = parse_args(argv, world_size=2)
    parallel_state.destroy_model_parallel()  # fresh model-parallel groups for this layout
    initialize_distributed(tp, pp, seed)
    config = transformer_config(args)
    model = build_model(args, config)
    return (model, *build_optimizer(args, config, model), config)


def _train(run, steps):
    """Losses of `steps` steps on the fixed global batch; None off the last stage."""
    from tests import tiny_gpt

    model, optimizer, scheduler, config = run
    losses = []
    for _ in range(steps):
        losses += tiny_gpt.train(model[0], optimizer, config, tiny_gpt.global_batch(), 1) or [None]
        scheduler.step(1)
    return losses


def _rng_draws():
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracker = torch.rand(1).item()
    return random.random(), float(np.random.rand()), torch.rand(1).item(), tracker


class _Killed(Exception):
    pass


def _save_killed_before_commit(root, run):
    """A save whose ranks all die once their shards are written, before the tracker."""
    from unittest import mock

    from megatron.core import dist_checkpointing

    from megatron_raptr.training import checkpointing

    save = dist_checkpointing.save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    with mock.patch.object(dist_checkpointing, "save", save_then_die):
        try:
            checkpointing.save_checkpoint(root, 4, *run[:3], dict(SAVED, iteration=4))
        except _Killed:
            pass


def _saved_dir(root, optimizer, case):
    """Where each case loads from: distributed Adam's per-rank format loads only under the
    saved TP and PP, so its resharded cases load the fully reshardable save."""
    if case == "async":
        return os.path.join(root, f"{optimizer}-async")
    if optimizer == "distributed-adam" and CASES[case] != CASES["same"]:
        return os.path.join(root, "distributed-adam-reshardable")
    return os.path.join(root, optimizer)


def _save_reference(root, optimizer, run):
    """The reference's saves at iteration 2, with the times each gathered the distributed
    optimizer's state over DP (Megatron's get_parameter_state_dp_zero)."""
    from unittest import mock

    from megatron.core.optimizer import DistributedOptimizer

    from megatron_raptr.training import checkpointing

    saves = {optimizer: {}, f"{optimizer}-async": dict(async_save=True)}
    if optimizer == "distributed-adam":
        saves["distributed-adam-reshardable"] = dict(optim_fully_reshardable=True)
    gathers = {}
    gather = DistributedOptimizer.get_parameter_state_dp_zero
    for name, options in saves.items():
        with mock.patch.object(DistributedOptimizer, "get_parameter_state_dp_zero", autospec=True,
                               side_effect=gather) as spy:
            checkpointing.save_checkpoint(os.path.join(root, name), 2, *run[:3], SAVED, **options)
        gathers[name] = spy.call_count
    return gathers


def _bytes_per_rank(path):
    """Bytes of torch_dist shard files (__RANK_THREAD.distcp) each rank wrote."""
    sizes = {}
    for name in os.listdir(path):
        if name.endswith(".distcp"):
            rank = int(name.split("_")[2])
            sizes[rank] = sizes.get(rank, 0) + os.path.getsize(os.path.join(path, name))
    return sizes


def _tracker(load_dir):
    from megatron_raptr.training.checkpointing import TRACKER

    with open(os.path.join(load_dir, TRACKER)) as f:
        return f.read().strip()


def _load_error(load_dir, run):
    from megatron_raptr.training import checkpointing

    try:
        checkpointing.load_checkpoint(load_dir, *run[:3])
    except RuntimeError as error:
        return str(error)
    return None


def _broken_dirs(root):
    """--load directories that hold no loadable checkpoint, by what is wrong."""
    import shutil

    from megatron_raptr.training.checkpointing import TRACKER

    dirs = {name: os.path.join(root, name) for name in ("garbled", "dangling", "unfinished")}
    for name, path in dirs.items():
        shutil.copytree(os.path.join(root, "adam"), path)
    with open(os.path.join(dirs["garbled"], TRACKER), "w") as f:
        f.write("iter_2\n")
    with open(os.path.join(dirs["dangling"], TRACKER), "w") as f:
        f.write("7\n")
    os.remove(os.path.join(dirs["unfinished"], TRACKER))
    return dirs


def _checkpoint_job(root):
    import torch.distributed as dist
    from megatron.core.utils import unwrap_model

    from megatron_raptr.training import checkpointing

    result = {"reference": {}, "resumed": {}, "gathers": {}}
    for optimizer in OPTIMIZERS:
        run = _build(root, optimizer, 1, 1, seed=1234)
        _train(run, 2)
        result["gathers"].update(_save_reference(root, optimizer, run))
        rng = _rng_draws()
        result["reference"][optimizer] = dict(rng=rng, losses=_train(run, RESUMED_STEPS))
        checkpointing.finalize_saves()  # the asynchronous save, written while the reference trained on
    result["bytes_per_rank"] = _bytes_per_rank(checkpointing.checkpoint_dir(os.path.join(root, "adam"), 2))
    # A later save of the distributed-Adam reference dies; its loads below must ignore it.
    _save_killed_before_commit(os.path.join(root, "distributed-adam"), run)
    result["tracker_after_killed_save"] = _tracker(os.path.join(root, "distributed-adam"))

    for optimizer in OPTIMIZERS:
        for case, (tp, pp) in CASES.items():
            load_dir = _saved_dir(root, optimizer, case)
            run = _build(root, optimizer, tp, pp, seed=99, extra=("--load", load_dir))
            state = checkpointing.load_checkpoint(load_dir, *run[:3], fully_parallel=case == "same")
            rng = _rng_draws()
            losses = _train(run, RESUMED_STEPS)
            vocab = unwrap_model(run[0])[0].vocab_size
            result["resumed"][optimizer, case] = dict(state=state, rng=rng, losses=losses, vocab=vocab)

    # An asynchronous save (of the last resumed run) becomes the latest only once finalized:
    # a job killed before then resumes from the previous one.
    async_dir = os.path.join(root, "distributed-adam-async")
    checkpointing.save_checkpoint(async_dir, 4, *run[:3], dict(SAVED, iteration=4), async_save=True)
    result["async_tracker"] = {"pending": _tracker(async_dir)}
    checkpointing.finalize_saves()
    result["async_tracker"]["finalized"] = _tracker(async_dir)

    # None of these loads gets as far as a collective. `run` has the distributed optimizer
    # and Megatron-LM's padding for TP=2, not the checkpoint's.
    run = _build(root, "distributed-adam", 2, 1, seed=99)
    result["missing"] = checkpointing.load_checkpoint(os.path.join(root, "none"), *run[:3])
    result["errors"] = {"optimizer": _load_error(os.path.join(root, "adam"), run),
                        "per-rank": _load_error(os.path.join(root, "distributed-adam"), run),
                        "vocabulary": _load_error(os.path.join(root, "distributed-adam-reshardable"), run)}
    if dist.get_rank() == 0:
        result["broken"] = _broken_dirs(root)
        result["errors"].update({name: _load_error(path, run) for name, path in result["broken"].items()})
    return result


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("checkpoints"))
    train_sentencepiece(stdlib_documents(), os.path.join(root, "spm"), SENTENCEPIECE_VOCAB)
    return root


@pytest.fixture(scope="module")
def job(root):
    return run_distributed(_checkpoint_job, 2, root)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resumed_training_matches_uninterrupted_run(job, optimizer, case):
    last = job[-1]  # the last pipeline stage has the losses under every layout
    resumed = last["resumed"][optimizer, case]
    assert resumed["state"] == SAVED
    assert resumed["vocab"] == 640  # the checkpoint's padding; Megatron-LM's under TP=2 is 768
    assert resumed["losses"] == pytest.approx(last["reference"][optimizer]["losses"], rel=1e-5, abs=0)


def test_same_layout_resume_is_bit_exact(job):
    for rank in job:
        for optimizer in OPTIMIZERS:
            for case in ("same", "async"):
                assert rank["resumed"][optimizer, case]["losses"] == rank["reference"][optimizer]["losses"]


def test_rng_states_restored_only_under_the_saved_layout(job):
    for rank in job:
        for optimizer in OPTIMIZERS:
            reference = rank["reference"][optimizer]["rng"]
            assert rank["resumed"][optimizer, "same"]["rng"] == reference
            assert rank["resumed"][optimizer, "async"]["rng"] == reference
            assert rank["resumed"][optimizer, "tp2"]["rng"] != reference


def test_distributed_optimizer_state_is_gathered_only_for_the_reshardable_format(job):
    for rank in job:
        assert rank["gathers"]["distributed-adam"] == 0
        assert rank["gathers"]["distributed-adam-async"] == 0
        assert rank["gathers"]["distributed-adam-reshardable"] > 0


def test_replicated_shards_are_written_by_every_data_parallel_rank(job):
    # Adam's checkpoint is all DP replicas (model and optimizer state): fully parallel, each
    # of the two ranks writes about half of it rather than DP rank 0 all of it.
    sizes = job[0]["bytes_per_rank"]
    assert set(sizes) == {0, 1}
    assert min(sizes.values()) > 0.3 * sum(sizes.values())


def test_killed_save_leaves_previous_checkpoint_latest(job):
    # The resumed runs loaded this checkpoint after the killed save of iteration 4.
    assert job[0]["tracker_after_killed_save"] == "2"
    assert job[0]["resumed"]["distributed-adam", "same"]["state"]["iteration"] == 2


def test_async_save_is_latest_only_once_finalized(job):
    for rank in job:
        assert rank["async_tracker"] == {"pending": "2", "finalized": "4"}


def test_missing_directory_has_no_checkpoint(job):
    assert job[0]["missing"] is None


def test_load_errors_name_the_flag_and_the_problem(job):
    errors, broken = job[0]["errors"], job[0]["broken"]
    assert "saved without --use-distributed-optimizer" in errors["optimizer"]
    assert ("state per DP rank, which loads only under its --tensor-model-parallel-size 1 and "
            "--pipeline-model-parallel-size 1 (this run: 2 and 1)") in errors["per-rank"]
    assert "--dist-ckpt-optim-fully-reshardable" in errors["per-rank"]
    assert "should hold an iteration number, not 'iter_2'" in errors["garbled"]
    assert "names iteration 7" in errors["dangling"] and "iter_0000007" in errors["dangling"]
    assert "iter_0000002" in errors["unfinished"] and "not a completed save" in errors["unfinished"]
    for name, path in broken.items():
        assert errors[name].startswith(f"--load {path}:")
    assert "padded to 640 rows, this model has 768" in errors["vocabulary"]


@pytest.mark.parametrize("extra, world_size, message", [
    # A TP size that does not divide the checkpoint's 640 rows (5 x 128).
    (["--tensor-model-parallel-size", "3", "--num-attention-heads", "6", "--hidden-size", "96"], 3,
     "padded to 640 rows, which --tensor-model-parallel-size 3 cannot split evenly"),
    # 700 ids and an end-of-document id: 701 ids under megatron-core 0.16, 700 under 0.19 (EOD counted in).
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "700"], 1, "640 rows, fewer than the tokenizer's 70"),
    # Megatron's scheduler would go on with the checkpoint's style (linear) and ignore the flag.
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "1"], 1,
     "continues its LR schedule, --lr-decay-style linear, but this run gives --lr-decay-style WSD"),
], ids=["tp-does-not-divide", "larger-tokenizer", "another-lr-schedule"])
def test_checkpoint_the_run_cannot_continue_is_refused_before_training(job, root, extra, world_size, message,
                                                                      capsys):
    load = os.path.join(root, "adam")
    with pytest.raises(SystemExit):
        parse_args(_argv(root, "--load", load, *extra), world_size=world_size)
    error = capsys.readouterr().err
    assert f"--load {load}: " in error and message in error


def test_broken_load_directory_is_refused_before_training(job, root, capsys):
    for path in job[0]["broken"].values():
        with pytest.raises(SystemExit):
            parse_args(_argv(root, "--load", path))
        assert f"--load {path}: " in capsys.readouterr().err


def test_per_rank_optimizer_state_under_another_layout_is_refused_before_training(job, root, capsys):
    load = os.path.join(root, "distributed-adam")
    with pytest.raises(SystemExit):
        parse_args(_argv(root, "--load", load, "--use-distributed-optimizer", "--tensor-model-parallel-size", "2"),
                   world_size=2)
    error = capsys.readouterr().err
    assert f"--load {load}: " in error and "--dist-ckpt-optim-fully-reshardable" in error


def _reshardable_bucket_check(root):
    from megatron_raptr.ddp import TAKES_PARAM_LAYOUT
    from megatron_raptr.training import checkpointing

    model = _build(root, "distributed-adam", 1, 1, seed=1234,
                   extra=("--overlap-grad-reduce", "--ddp-bucket-size", "3000"))[0]
    try:
        checkpointing.check_reshardable_buckets(model)
    except RuntimeError as error:
        return len(model[0].buffers[0].buckets), TAKES_PARAM_LAYOUT, str(error)
    return len(model[0].buffers[0].buckets), TAKES_PARAM_LAYOUT, None


def test_fully_reshardable_format_is_refused_only_for_layouts_it_would_misplace(root):
    """Megatron's own multi-bucket layout (megatron-core 0.16) is refused; RaPTr's per-layer layout
    (0.17+) is saved and resharded by the resumes above (tp2, pp2 load the fully reshardable save)."""
    (buckets, per_layer_layout, error), _ = run_distributed(_reshardable_bucket_check, 2, root)
    assert buckets > 1
    if per_layer_layout:
        assert error is None
    else:
        assert "--dist-ckpt-optim-fully-reshardable" in error and "--ddp-bucket-size" in error

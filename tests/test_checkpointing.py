"""Checkpoints resume training exactly, under any TP/PP/DP layout.

One two-rank job, per optimizer (Adam, distributed Adam): a TP=1/PP=1/DP=2 reference
trains two steps, saves, records its RNG draws and trains three more steps. Then, for
each layout, the ranks build the model from another seed, load and train those three
steps again. Each loss is computed before its step's update: the first resumed loss
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
LAYOUTS = {"same": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # (TP, PP); DP = 2 / (TP x PP)
RESUMED_STEPS = 3
SAVED = dict(iteration=2, consumed_samples=8, raptr_schedule="2@0,4@0.5", seed=1234)


def _argv(root, *extra):
    return ARGV + ["--tokenizer-model", os.path.join(root, "spm.model"), *extra]


def _build(root, optimizer, tp, pp, seed, load=()):
    """Built as pretrain() builds it; `load` ("--load", DIR) sizes the vocabulary as that checkpoint's."""
    from megatron.core import parallel_state

    from megatron_raptr.training.arguments import parse_args
    from megatron_raptr.training.initialize import initialize_distributed
    from megatron_raptr.training.model import build_model, build_optimizer, transformer_config

    argv = _argv(root, *OPTIMIZERS[optimizer], *load)
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

    result = {"reference": {}, "resumed": {}}
    for optimizer in OPTIMIZERS:
        run = _build(root, optimizer, 1, 1, seed=1234)
        _train(run, 2)
        checkpointing.save_checkpoint(os.path.join(root, optimizer), 2, *run[:3], SAVED)
        rng = _rng_draws()
        result["reference"][optimizer] = dict(rng=rng, losses=_train(run, RESUMED_STEPS))
    # A later save of the distributed-Adam reference dies; its loads below must ignore it.
    _save_killed_before_commit(os.path.join(root, "distributed-adam"), run)
    with open(os.path.join(root, "distributed-adam", checkpointing.TRACKER)) as f:
        result["tracker_after_killed_save"] = f.read().strip()

    for optimizer in OPTIMIZERS:
        for layout, (tp, pp) in LAYOUTS.items():
            load_dir = os.path.join(root, optimizer)
            run = _build(root, optimizer, tp, pp, seed=99, load=("--load", load_dir))
            state = checkpointing.load_checkpoint(load_dir, *run[:3])
            rng = _rng_draws()
            losses = _train(run, RESUMED_STEPS)
            vocab = unwrap_model(run[0])[0].vocab_size
            result["resumed"][optimizer, layout] = dict(state=state, rng=rng, losses=losses, vocab=vocab)

    # None of these loads gets as far as a collective. `run` has the distributed optimizer
    # and Megatron-LM's padding for TP=2, not the checkpoint's.
    run = _build(root, "distributed-adam", 2, 1, seed=99)
    result["missing"] = checkpointing.load_checkpoint(os.path.join(root, "none"), *run[:3])
    result["errors"] = {"optimizer": _load_error(os.path.join(root, "adam"), run),
                        "vocabulary": _load_error(os.path.join(root, "distributed-adam"), run)}
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resumed_training_matches_uninterrupted_run(job, optimizer, layout):
    last = job[-1]  # the last pipeline stage has the losses under every layout
    resumed = last["resumed"][optimizer, layout]
    assert resumed["state"] == SAVED
    assert resumed["vocab"] == 640  # the checkpoint's padding; Megatron-LM's under TP=2 is 768
    assert resumed["losses"] == pytest.approx(last["reference"][optimizer]["losses"], rel=1e-5, abs=0)


def test_rng_states_restored_only_under_the_saved_layout(job):
    for rank in job:
        for optimizer in OPTIMIZERS:
            reference = rank["reference"][optimizer]["rng"]
            assert rank["resumed"][optimizer, "same"]["rng"] == reference
            assert rank["resumed"][optimizer, "tp2"]["rng"] != reference


def test_killed_save_leaves_previous_checkpoint_latest(job):
    # The resumed runs loaded this checkpoint after the killed save of iteration 4.
    assert job[0]["tracker_after_killed_save"] == "2"
    assert job[0]["resumed"]["distributed-adam", "same"]["state"]["iteration"] == 2


def test_missing_directory_has_no_checkpoint(job):
    assert job[0]["missing"] is None


def test_load_errors_name_the_flag_and_the_problem(job):
    errors, broken = job[0]["errors"], job[0]["broken"]
    assert "saved without --use-distributed-optimizer" in errors["optimizer"]
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
], ids=["tp-does-not-divide", "larger-tokenizer"])
def test_vocabulary_the_checkpoint_cannot_load_into_is_refused_before_training(job, root, extra, world_size,
                                                                               message, capsys):
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

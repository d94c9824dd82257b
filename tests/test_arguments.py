"""Bad command lines fail before any work, naming the flag and what is wrong."""

import pytest

from megatron_raptr.training.arguments import parse_args

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100").split()


def test_derived_defaults():
    args = parse_args(BASE + ["--global-batch-size", "16"], world_size=4)
    assert (args.data_parallel_size, args.num_microbatches, args.ffn_hidden_size) == (4, 2, 256)
    assert args.raptr.num_layers == 4 and args.raptr.stages[0].length == 4  # baseline: full model
    assert args.check_for_nan_in_loss_and_grad and not args.exit_signal_handler  # Megatron-LM's defaults
    assert not parse_args(BASE + ["--no-check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad


@pytest.mark.parametrize("extra, world_size, message", [
    (["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads 4 is not divisible by --tensor-model"),
    (["--pipeline-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
    (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--raptr-schedule", "2@0,3@20"], 1, "--raptr-schedule"),
    (["--raptr-schedule", "2@0", "--raptr-fixed-layers", "5"], 1, "--raptr-fixed-layers must be distinct"),
    (["--raptr-fixed-layers", "1"], 1, "--raptr-fixed-layers needs --raptr-schedule"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--exit-signal-handler"], 1, "--exit-signal-handler needs --save"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are exclusive"),
])
def test_bad_arguments_name_the_flag(extra, world_size, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + extra, world_size=world_size)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag in ("--save", "--tensorboard-dir"):
        with pytest.raises(SystemExit):
            parse_args(BASE + [flag, str(blocker / "sub")])
        assert f"{flag}: cannot create" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--metrics-file", str(blocker / "metrics.jsonl")])
    assert "--metrics-file: cannot create" in capsys.readouterr().err


"""Bad command lines fail before any work, naming the flag and what is wrong."""

import sys

import pytest
import torch

from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE

from megatron_raptr.training.arguments import parse_args

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100").split()


def test_derived_defaults():
    args = parse_args(BASE + ["--global-batch-size", "16"], world_size=4)
    assert (args.data_parallel_size, args.num_microbatches, args.ffn_hidden_size) == (4, 2, 256)
    assert (args.max_position_embeddings, args.lr_decay_iters) == (32, 10)
    assert args.raptr.num_layers == 4 and args.raptr.stages[0].length == 4  # baseline: full model
    assert args.check_for_nan_in_loss_and_grad and not args.exit_signal_handler  # Megatron-LM's defaults
    assert not parse_args(BASE + ["--no-check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad
    assert parse_args(BASE + ["--overlap-grad-reduce"], world_size=2).overlap_grad_reduce
    assert not parse_args(BASE + ["--overlap-grad-reduce"], world_size=1).overlap_grad_reduce  # no DP to overlap


def test_wsd_decay_style_defaults_to_megatron_lms_and_the_decay_may_fill_the_span_after_warmup():
    wsd = BASE + ["--lr-decay-style", "WSD", "--lr-warmup-iters", "2", "--lr-wsd-decay-iters", "8"]
    args = parse_args(wsd)
    assert (args.lr_wsd_decay_style, args.lr_wsd_decay_iters) == ("exponential", 8)
    assert parse_args(wsd + ["--lr-wsd-decay-style", "minus_sqrt"]).lr_wsd_decay_style == "minus_sqrt"


POSITIVE = ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--micro-batch-size",
            "--train-iters", "--log-interval", "--eval-interval", "--make-vocab-size-divisible-by",
            "--ffn-hidden-size", "--max-position-embeddings", "--global-batch-size", "--lr-decay-iters",
            "--save-interval", "--exit-interval", "--lr-wsd-decay-iters"]
NOT_NEGATIVE = ["--raptr-verify-sync", "--raptr-stage-warmup-iters", "--eval-iters", "--lr-warmup-iters", "--num-workers"]


@pytest.mark.parametrize("fixed, expected", [(["1,4"], (1, 4)), (["1", "4"], (1, 4)), (["1,", "3,4"], (1, 3, 4)),
                                             ([], ())])
def test_fixed_layers_separated_by_commas_or_spaces(fixed, expected):
    args = parse_args(BASE + ["--raptr-schedule", "3@0", "--raptr-fixed-layers", *fixed])
    assert args.raptr.fixed_layers == expected


def test_schedule_defaults():
    args = parse_args(BASE + ["--raptr-schedule", "3@0"])
    assert (args.raptr.fixed_layers, args.raptr.sampling, args.raptr.scaling) == ((1, 4), "bernoulli", "none")
    assert args.method == "raptr"


def test_data_loader_workers_default_to_none_on_the_cpu():
    assert parse_args(BASE).num_workers == (2 if torch.cuda.is_available() else 0)
    assert parse_args(BASE + ["--num-workers", "2"]).num_workers == 2


def test_each_method_flag_chooses_its_method_with_defaults():
    assert parse_args(BASE).method == "baseline"
    stacking = parse_args(BASE + ["--stacking-schedule", "2@0,4@5", "--raptr-verify-sync", "1",
                                  "--raptr-stage-warmup-iters", "2"])
    assert (stacking.method, stacking.raptr.copy, stacking.raptr.optimizer_state) == ("stacking", "top", "fresh")
    assert stacking.method_flags == "--stacking-schedule 2@0,4@5"
    fraction = parse_args(BASE + ["--stacking-schedule", "2@0,4@5", "--raptr-stage-warmup-fraction", "0.25"])
    assert fraction.raptr_stage_warmup_iters == round(0.25 * fraction.train_iters) > 0
    for flags, theta, gamma in ((["--pld-theta", "0.3"], 0.3, 0.001), (["--pld-gamma", "0.1"], 0.5, 0.1)):
        pld = parse_args(BASE + flags)
        assert (pld.method, pld.raptr.theta_bar, pld.raptr.gamma) == ("pld", theta, gamma)
    # Skipped layers take no optimizer step by default under RaPTr only (what the defaults study measured).
    raptr = BASE + ["--raptr-schedule", "2@0"]
    assert [parse_args(argv).raptr_skip_optimizer_step for argv in (
        raptr, BASE, BASE + ["--pld-theta", "0.3"], BASE + ["--stacking-schedule", "2@0,4@5"],
        raptr + ["--no-raptr-skip-optimizer-step"], BASE + ["--pld-theta", "0.3", "--raptr-skip-optimizer-step"],
    )] == [True, False, False, False, False, True]


@pytest.mark.parametrize("extra, world_size, message", [
    *[([flag, "0"], 1, f"{flag} must be positive, got 0") for flag in POSITIVE],
    *[([flag, "-1"], 1, f"{flag} must not be negative") for flag in NOT_NEGATIVE],
    (["--tensor-model-parallel-size", "0"], 1, "--tensor-model-parallel-size 0 x --pipeline"),
    (["--pipeline-model-parallel-size", "0"], 1, "--pipeline-model-parallel-size 0"),
    (["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads 4 is not divisible by --tensor-model"),
    (["--pipeline-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--hidden-size", "66"], 1, "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    (["--max-position-embeddings", "16"], 1, "--max-position-embeddings 16 is shorter than --seq-length 32"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be less than --lr-decay-iters 10"),
    (["--lr-decay-style", "WSD"], 1, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-wsd-decay-iters", "3"], 1, "--lr-wsd-decay-iters needs --lr-decay-style WSD"),
    (["--lr-decay-style", "cosine", "--lr-wsd-decay-style", "linear"], 1,
     "--lr-wsd-decay-style needs --lr-decay-style WSD"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "11"], 1,
     "--lr-wsd-decay-iters 11 exceeds the 10 iterations between --lr-warmup-iters 0 and --lr-decay-iters 10"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5", "--lr-warmup-iters", "2", "--lr-decay-iters", "6"], 1,
     "--lr-wsd-decay-iters 5 exceeds the 4 iterations between --lr-warmup-iters 2 and --lr-decay-iters 6"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3", "--lr-wsd-decay-style", "step"], 1,
     "argument --lr-wsd-decay-style: invalid choice: 'step'"),
    (["--global-batch-size", "6"], 2, "--global-batch-size 6 is not divisible"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--raptr-schedule", "2@0,3@20"], 1, "--raptr-schedule"),
    (["--raptr-schedule", "2@0", "--raptr-fixed-layers", "5"], 1, "--raptr-fixed-layers must be distinct"),
    (["--skip-train"], 1, "--skip-train evaluates a checkpoint: it needs --load"),
    (["--multiple-validation-sets"], 1, "--multiple-validation-sets needs --valid-data-path"),
    (["--raptr-fixed-layers", "1"], 1, "--raptr-fixed-layers needs --raptr-schedule"),
    (["--raptr-fixed-layers"], 1, "--raptr-fixed-layers needs --raptr-schedule"),
    (["--raptr-sampling", "fixed-size"], 1, "--raptr-sampling needs --raptr-schedule"),
    (["--raptr-scaling", "none"], 1, "--raptr-scaling needs --raptr-schedule"),
    (["--raptr-verify-sync", "5"], 1, "--raptr-verify-sync needs a method: --raptr-schedule, --stacking-schedule"),
    (["--raptr-stage-warmup-iters", "5"], 1, "--raptr-stage-warmup-iters needs stages: --raptr-schedule or "
                                             "--stacking-schedule"),
    (["--pld-theta", "0.5", "--raptr-stage-warmup-iters", "5"], 1, "--raptr-stage-warmup-iters needs stages"),
    (["--raptr-stage-warmup-fraction", "0.1"], 1, "--raptr-stage-warmup-fraction needs stages"),
    (["--raptr-schedule", "2@0", "--raptr-stage-warmup-fraction", "1.5"], 1,
     "--raptr-stage-warmup-fraction must lie in [0, 1), got 1.5"),
    (["--raptr-schedule", "2@0", "--raptr-stage-warmup-fraction", "0.1", "--raptr-stage-warmup-iters", "2"], 1,
     "--raptr-stage-warmup-fraction and --raptr-stage-warmup-iters: give one"),
    (["--raptr-schedule", "2@0", "--stacking-schedule", "2@0"], 1,
     "--raptr-schedule and --stacking-schedule choose different methods"),
    (["--stacking-schedule", "2@0", "--pld-gamma", "0.1"], 1,
     "--stacking-schedule and --pld-gamma choose different methods"),
    (["--pld-theta", "0.5", "--raptr-schedule", "2@0"], 1, "--raptr-schedule and --pld-theta choose different"),
    (["--stacking-copy", "middle"], 1, "--stacking-copy needs --stacking-schedule"),
    (["--pld-theta", "0.5", "--stacking-optimizer-state", "copy"], 1,
     "--stacking-optimizer-state needs --stacking-schedule"),
    (["--stacking-schedule", "2@0", "--raptr-sampling", "fixed-size"], 1, "--raptr-sampling needs --raptr-schedule"),
    (["--stacking-schedule", "2@0,4@1.5"], 1, "--stacking-schedule: stage '4@1.5'"),
    (["--stacking-schedule", "2@0,3@5,3@7"], 1, "--stacking-schedule: the model must grow at every boundary"),
    (["--stacking-schedule", "2.5@0"], 1, "--stacking-schedule: LENGTH must be a whole number of layers in 1..4"),
    (["--stacking-schedule", "1@0,3@5"], 1, "--stacking-schedule: growing from 1 to 3 layers at 5 copies 2"),
    (["--stacking-schedule", "2@3"], 1, "--stacking-schedule: the first stage must start at iteration 0"),
    (["--pld-theta", "0"], 1, "--pld-theta must lie in (0, 1], got 0"),
    (["--pld-theta", "1.5"], 1, "--pld-theta must lie in (0, 1], got 1.5"),
    (["--pld-gamma", "0"], 1, "--pld-gamma must be positive, got 0"),
    (["--raptr-schedule", "2@0", "--raptr-fixed-layers", "1,x"], 1,
     "--raptr-fixed-layers: expected layer numbers separated by commas or spaces, got '1,x'"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--exit-signal-handler"], 1, "--exit-signal-handler needs --save"),
    (["--async-save"], 1, "--async-save needs --save"),
    # Refused before --save is created.
    (["--save", "never-created", "--dist-ckpt-optim-fully-reshardable"], 1,
     "--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are exclusive"),
    (["--moe-router-topk", "1", "--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size needs --num-experts"),
    (["--moe-z-loss-coeff", "0.1"], 1, "--moe-z-loss-coeff needs --num-experts"),
    (["--num-experts", "4"], 1, "--num-experts needs --disable-bias-linear"),
    *[(["--disable-bias-linear", "--num-experts", "4", *extra], world_size, message) for extra, world_size, message in [
        (["--moe-router-topk", "5"], 1, "--moe-router-topk 5 exceeds --num-experts 4"),
        (["--tensor-model-parallel-size", "2"], 2, "--tensor-model-parallel-size > 1 needs --sequence-parallel"),
        (["--expert-model-parallel-size", "3"], 3, "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
        (["--expert-model-parallel-size", "4"], 2, "--expert-model-parallel-size 4 x --expert-tensor-parallel-size 1"),
        (["--moe-layer-freq", "([0,1]*3)"], 1, "--moe-layer-freq: the pattern has 6 layers, --num-layers 4"),
        (["--moe-layer-freq", "[0,2,1,1]"], 1, "expected a list of 0 (dense) and 1 (MoE)"),
        (["--moe-layer-freq", "[open]"], 1, "--moe-layer-freq: not a list expression of digits"),
        (["--moe-layer-freq", "[1,0]*"], 1, "--moe-layer-freq: not a list expression: '[1,0]*'"),
        (["--stacking-schedule", "2@0"], 1, "--num-experts: gradual stacking"),
        (["--model", "bert"], 1, "--num-experts: mixture of experts is for --model gpt"),
        *([(["--moe-grouped-gemm"], 1, "--moe-grouped-gemm needs Transformer Engine")] if not HAVE_TE else []),
    ]],
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


def test_metrics_file_equal_to_tensorboard_dir_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--metrics-file", str(tmp_path), "--tensorboard-dir", str(tmp_path)])
    assert "--metrics-file and --tensorboard-dir must differ" in capsys.readouterr().err


def test_tensorboard_dir_without_tensorboard_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--tensorboard-dir", str(tmp_path / "tb")])
    assert "--tensorboard-dir needs the tensorboard package" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--enable-cuda-graph"], ["--external-cuda-graph"]])
def test_cuda_graphs_are_not_accepted(flag, capsys):
    """A replayed CUDA graph runs the layers it captured, whatever the step's path: only --cuda-graph-impl
    is known, to be refused with the reason."""
    with pytest.raises(SystemExit):
        parse_args(BASE + flag)
    assert f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


@pytest.mark.parametrize("flag, reason", [
    (["--optimizer", "sgd"], "are Adam's"),
    (["--use-precision-aware-optimizer"], ".decoupled_grad"),
    (["--optimizer-cpu-offload"], "HybridDeviceOptimizer"),
    (["--overlap-param-gather-with-optimizer-step"], "inside the optimizer step"),
    (["--fp8-format", "hybrid"], "amax histories"),
    (["--fp4-format", "nvfp4"], "FP4 has not been run"),
    (["--use-megatron-fsdp"], "shards would never be reduced"),
    (["--use-torch-fsdp2"], "shards would never be reduced"),
    (["--context-parallel-size", "2"], "Transformer Engine's attention"),
    (["--cuda-graph-impl", "local"], "runs the layers it captured"),
    (["--mtp-num-layers", "1"], "multi-token prediction"),
])
def test_refused_optimizer_and_precision_options_say_why(flag, reason, capsys):
    """The same table refuses them in Megatron-LM's loop (tests/test_megatron_lm.py)."""
    with pytest.raises(SystemExit):
        parse_args(BASE + flag)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: {' '.join(flag)}: refused with RaPTr: " in error and reason in error
    assert parse_args(BASE + ["--optimizer", "adam", "--context-parallel-size", "1"]).optimizer == "adam"


def test_fusions_default_to_what_the_machine_runs(monkeypatch):
    from megatron_raptr.training import model

    args = parse_args(BASE + ["--position-embedding-type", "rope"])  # this machine: no CUDA
    assert args.unfused == dict.fromkeys(["gradient accumulation", "masked softmax", "bias-GeLU",
                                          "bias-dropout-add", "RoPE"], "needs CUDA")
    config = model.transformer_config(args)
    assert not (config.gradient_accumulation_fusion or config.masked_softmax_fusion or config.bias_activation_fusion
                or config.bias_dropout_fusion or config.apply_rope_fusion)
    assert config.deallocate_pipeline_outputs is False  # Megatron-LM frees sent outputs only under PP
    assert model.transformer_config(parse_args(BASE + ["--pipeline-model-parallel-size", "2"], world_size=2)
                                    ).deallocate_pipeline_outputs
    # A GPU without Apex or Transformer Engine: the torch-compiled fusions, not the extensions.
    monkeypatch.setattr(model, "unavailable_fusions", lambda: {
        "--gradient-accumulation-fusion": "needs Apex", "--masked-softmax-fusion": "needs kernels"})
    args = parse_args(BASE + ["--no-bias-dropout-fusion"])
    assert args.unfused == {"gradient accumulation": "needs Apex", "masked softmax": "needs kernels"}
    config = model.transformer_config(args)
    assert config.bias_activation_fusion and not config.bias_dropout_fusion and not config.gradient_accumulation_fusion
    swiglu = parse_args(BASE + ["--swiglu", "--no-bias-swiglu-fusion"])
    assert not model.transformer_config(swiglu).bias_activation_fusion and "bias-SwiGLU" not in swiglu.unfused


@pytest.mark.parametrize("extra, message", [
    (["--gradient-accumulation-fusion"], "--gradient-accumulation-fusion: needs CUDA"),
    (["--masked-softmax-fusion"], "--masked-softmax-fusion: needs CUDA"),
    (["--bias-gelu-fusion"], "--bias-gelu-fusion: needs CUDA"),
    (["--bias-dropout-fusion"], "--bias-dropout-fusion: needs CUDA"),
    (["--rope-fusion"], "--rope-fusion: needs --position-embedding-type rope"),
    (["--bias-swiglu-fusion"], "--bias-swiglu-fusion: needs --swiglu"),
])
def test_fusions_asked_for_where_they_cannot_run_name_the_flag(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err

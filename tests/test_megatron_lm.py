"""RaPTr in Megatron-LM's own loop: examples/pretrain_gpt_megatron_lm.py on 2 CPU processes (gloo).

Needs megatron.training (megatron-core 0.17+, Python 3.12); skipped where it is absent.
Each job runs several trainings one after another in the same pair of processes, as
separate launches would (importing Megatron-LM costs each process ~15 s).
"""

import functools
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.training.training", reason="Megatron-LM's loop ships with megatron-core 0.17+")

from megatron_raptr.training.initialize import free_port  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "pretrain_gpt_megatron_lm.py")
# No --spec: RaPTr's is the default.
MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 2 "
         "--hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 512 "
         "--log-interval 4 --eval-interval 4 --eval-iters 1 --seed 11 --num-workers 0").split()
RAPTR = ["--raptr-schedule", "2@0,4@0.5", "--raptr-sampling", "fixed-size"]


def _probe_steps(steps):
    """Wraps Megatron-LM's train_step (inside RaPTr's wrapper, installed later around it) to
    record, per step, the matmul FLOPs this rank ran, which of its layers got gradients and
    which of them the optimizer step changed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from megatron.training import training

    from megatron_raptr.layer import raptr_layers

    original = training.train_step

    @functools.wraps(original)
    def train_step(*args, **kwargs):
        model = kwargs.get("model", args[2])
        layers = raptr_layers(model)
        before = {layer: [p.detach().clone() for p in layer.parameters()] for layer in layers}
        with FlopCounterMode(display=False) as counter:
            result = original(*args, **kwargs)
        steps.append(dict(
            iteration=kwargs["iteration"] + 1, flops=counter.get_total_flops(),
            with_grad=sorted(layer.layer_number for layer in layers
                             if any(bool(p.main_grad.count_nonzero()) for p in layer.parameters())),
            moved=sorted(layer.layer_number for layer in layers
                         if not all(map(torch.equal, before[layer], layer.parameters()))),
            layers=sorted(layer.layer_number for layer in layers),
            skip_grad_comm=model[0].skip_idle_grad_comm,
        ))
        return result

    training.train_step = train_step


def _train_each(argvs):
    """Runs the example once per argv in this process group; returns this rank's probed steps per run."""
    from megatron.training.training import destroy_global_state

    steps = []
    _probe_steps(steps)
    runs = []
    for argv in argvs:
        del steps[:]
        sys.argv = [EXAMPLE, *argv]
        try:
            runpy.run_path(EXAMPLE, run_name="__main__")
        except SystemExit as stop:  # --exit-interval ends the program
            assert stop.code == 0, stop
        destroy_global_state()
        runs.append(list(steps))
    return runs


def _argv(tmp_path, name, *extra, iters=8):
    return [*MODEL, "--train-iters", str(iters), "--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra]


def _records(tmp_path, name):
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    return [r for r in records if "lm_loss" in r], [r for r in records if "val_loss" in r]


def test_raptr_in_megatron_lm_loop_skips_layers(tmp_path):
    """2 active layers per step, then 4, with falling loss; skipped layers cost no FLOPs, get
    zero gradients (plain DDP: gradients are whole on every rank) and take no optimizer step
    (RaPTr's default); the stage hook re-warms the LR."""
    ranks = run_distributed(_train_each, 2, [_argv(tmp_path, "raptr", *RAPTR, "--raptr-verify-sync", "1",
                                                   "--raptr-stage-warmup-iters", "2")])
    train, evals = _records(tmp_path, "raptr")
    assert [r["iteration"] for r in train] == list(range(1, 9))
    assert [r["path_length"] for r in train] == [2] * 4 + [4] * 4
    assert all(r["active_layers"][0] == 1 and r["active_layers"][-1] == 4 for r in train)
    assert set(train[0]) == {"iteration", "method", "stage", "path_length", "active_layers", "lm_loss", "lr",
                             "grad_norm", "tokens", "step_flops", "cumulative_flops", "elapsed_s"}
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    # Megatron-LM's linear decay after 2 warm-up steps to 0 at step 8: step t trains at
    # 1e-3 * (8 - t) / 6; the stage starting at step 4 re-warms over 2 steps.
    assert [r["lr"] for r in train[2:]] == pytest.approx([1e-3 * (8 - t) / 6 * (0.5 if t == 4 else 1)
                                                          for t in range(2, 8)])
    assert [r["iteration"] for r in evals] == [4, 8]
    for (steps,) in ranks:
        assert [s["iteration"] for s in steps] == list(range(1, 9))
        for step, record in zip(steps, train):
            assert step["with_grad"] == record["active_layers"], step
            assert step["moved"] == (record["active_layers"] if record["lr"] > 0 else []), step  # warm-up from 0
            # Data-parallel ranks split the global batch: each runs half the step's FLOPs.
            assert step["flops"] * 2 == record["step_flops"], step
        assert steps[0]["flops"] < steps[-1]["flops"]


def test_moe_under_expert_parallelism(tmp_path):
    """Megatron-LM's MoE flags, experts split over the 2 ranks (all-to-all dispatch): exactly the path's
    layers get gradients and change in the optimizer step (Megatron chains a dense and an expert optimizer
    here), the two ranks together run the step's counted FLOPs (router and top-k experts:
    each rank computes the tokens routed to its experts), and the records carry the auxiliary losses."""
    model = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff",
             "0.001", "--moe-layer-freq", "([1,0,1,1])", "--swiglu", "--disable-bias-linear",
             "--moe-token-dispatcher-type", "alltoall"]
    moe = [*model, "--expert-model-parallel-size", "2"]
    # And the experts split by tensor parallelism instead (expert TP = TP = 2, sequence parallel).
    tensor_parallel = [*model, "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    ranks = run_distributed(_train_each, 2, [_argv(tmp_path, name, *RAPTR, "--raptr-verify-sync", "1", *flags)
                                             for name, flags in (("moe", moe), ("moe-tp2", tensor_parallel))])
    for run, name in enumerate(("moe", "moe-tp2")):
        train, _ = _records(tmp_path, name)
        assert [r["path_length"] for r in train] == [2] * 4 + [4] * 4
        assert all(r["load_balancing_loss"] > 0 and r["z_loss"] > 0 for r in train)
        assert train[-1]["lm_loss"] < train[0]["lm_loss"]
        for rank in ranks:
            for step, record in zip(rank[run], train):
                assert step["with_grad"] == record["active_layers"], (name, step)
                assert step["moved"] == (record["active_layers"] if record["lr"] > 0 else []), (name, step)  # experts too
    train, _ = _records(tmp_path, "moe")
    for step, other, record in zip(ranks[0][0], ranks[1][0], train):
        assert step["flops"] + other["flops"] == record["step_flops"], record


def test_paths_agree_under_tensor_pipeline_and_data_parallelism(tmp_path):
    """Every rank checks the path checksum each step (--raptr-verify-sync 1); each layout trains the
    paths of the single-layout run, on pipeline stages that hold only some of the layers."""
    layouts = {
        "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "pp2": ["--pipeline-model-parallel-size", "2"],
        "dp2": ["--use-distributed-optimizer", "--overlap-grad-reduce"],
        "dp2-every-bucket": ["--use-distributed-optimizer", "--overlap-grad-reduce", "--no-raptr-skip-grad-comm"],
        "dp2-param-gather": ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"],
        "dp2-recompute-full": ["--use-distributed-optimizer", "--overlap-grad-reduce", "--recompute-granularity",
                               "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
        "dp2-recompute-selective": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                    "--recompute-granularity", "selective"],
    }
    # Any 2 of the 4 layers: two layers in a row that the last step changed can be off the path,
    # and the second one is then gathered by no hook.
    any_two = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--raptr-schedule", "2@0",
               "--raptr-fixed-layers"]
    others = {"dp2-any-two": any_two, "dp2-any-two-param-gather": any_two + ["--overlap-param-gather"]}
    schedule = ["--raptr-schedule", "2@0,3@0.5", "--raptr-sampling", "fixed-size", "--raptr-verify-sync", "1"]
    ranks = run_distributed(_train_each, 2, [_argv(tmp_path, name, *schedule, *extra)
                                             for name, extra in {**layouts, **others}.items()])
    paths = {name: [r["active_layers"] for r in _records(tmp_path, name)[0]] for name in layouts}
    assert all(path == paths["dp2"] for path in paths.values())
    assert len({tuple(path) for path in paths["dp2"][4:]}) > 1  # stage 1 really samples
    for name in layouts:
        losses = [r["lm_loss"] for r in _records(tmp_path, name)[0]]
        assert losses[-1] < losses[0], name
    # Reducing the idle buckets too, or gathering parameters during the next forward (where skipped
    # layers run no hooks), changes nothing but the communication, and recomputing activations (full or
    # selective) nothing but the memory: training and evaluation losses.
    def losses(name):
        train, evals = _records(tmp_path, name)
        return [r["lm_loss"] for r in train], [r["val_loss"] for r in evals]

    for name, reference in (("dp2-every-bucket", "dp2"), ("dp2-param-gather", "dp2"), ("dp2-recompute-full", "dp2"),
                            ("dp2-recompute-selective", "dp2"), ("dp2-any-two-param-gather", "dp2-any-two")):
        assert losses(name) == losses(reference), name
    assert all(run[2][0]["skip_grad_comm"] and not run[3][0]["skip_grad_comm"] for run in ranks)
    pp_steps = [run[1] for run in ranks]  # per rank: the pp2 run
    assert [s["layers"] for s in pp_steps[0][0:1]] == [[1, 2]] and [s["layers"] for s in pp_steps[1][0:1]] == [[3, 4]]
    for steps in pp_steps:
        for step, path in zip(steps, paths["pp2"]):
            assert step["with_grad"] == [layer for layer in step["layers"] if layer in path], step


def test_resume_from_megatron_lm_checkpoint_repeats_the_run(tmp_path):
    """Megatron-LM's own torch_dist checkpoint. (Without Transformer Engine or Apex, megatron-core
    0.19.2's load_checkpoint cannot describe the distributed optimizer's state before its first
    step, so this resumes the regular optimizer.)"""
    ckpt = str(tmp_path / "ckpt")
    common = [*RAPTR, "--overlap-grad-reduce"]
    run_distributed(_train_each, 2, [
        _argv(tmp_path, "uninterrupted", *common),
        _argv(tmp_path, "first-half", *common, "--save", ckpt, "--save-interval", "4", "--exit-interval", "4"),
        _argv(tmp_path, "resumed", *common, "--load", ckpt),
    ])
    reference, _ = _records(tmp_path, "uninterrupted")
    first, _ = _records(tmp_path, "first-half")
    resumed, _ = _records(tmp_path, "resumed")
    assert [r["iteration"] for r in first] == [1, 2, 3, 4]
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    for key in ("active_layers", "lm_loss", "lr", "cumulative_flops"):
        assert [r[key] for r in first + resumed] == [r[key] for r in reference], key


# The three methods; the loops must agree on every record.
METHODS = {"raptr": ["--raptr-schedule", "2@0,4@10"], "stacking": ["--stacking-schedule", "2@0,4@10"],
           "pld": ["--pld-theta", "0.5", "--pld-gamma", "0.1"]}
# Megatron-LM draws the weights on the CPU whole (it must, without CUDA); pretrain_raptr.py does
# too with this flag, so both loops start from the same weights. One evaluation, at the end:
# Megatron-LM's validation iterator moves on between evaluations, pretrain_raptr.py's restarts.
BOTH_LOOPS = ["--train-iters", "20", "--eval-interval", "20", "--use-cpu-initialization"]
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--raptr-verify-sync", "1"],
           "pp2": ["--pipeline-model-parallel-size", "2", "--raptr-verify-sync", "1"],
           # Layers 1 and 3 on rank 0, 2 and 4 on rank 1: the growth copies across virtual stages.
           "vpp": ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
                   "--raptr-verify-sync", "1"]}


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    """Each method through both loops on 2 ranks (DP=2); gradual stacking in Megatron-LM's loop also
    saved at its growth boundary, resumed there, continued under TP=2 and PP=2 (also with virtual
    stages), and trained with the distributed optimizer."""
    from tests.test_pretrain import _pretrain_each

    tmp = tmp_path_factory.mktemp("methods")

    def argv(name, *extra):
        return [*MODEL, *BOTH_LOOPS, "--metrics-file", str(tmp / f"{name}.jsonl"), *extra]

    stacking, ckpt = METHODS["stacking"], str(tmp / "stacking-10")
    run_distributed(_train_each, 2, [
        *[argv(f"megatron-lm-{name}", *flags) for name, flags in METHODS.items()],
        argv("stacking-first-half", *stacking, "--save", ckpt, "--save-interval", "10", "--exit-interval", "10"),
        argv("stacking-resumed", *stacking, "--load", ckpt),
        *[argv(f"stacking-{name}", *stacking, *layout, "--load", ckpt) for name, layout in LAYOUTS.items()],
        argv("stacking-distributed-optimizer", *stacking, "--use-distributed-optimizer", "--overlap-grad-reduce"),
    ])
    run_distributed(_pretrain_each, 2, [argv(f"pretrain-raptr-{name}", *flags) for name, flags in METHODS.items()])
    return tmp


@pytest.mark.parametrize("method", METHODS)
def test_both_loops_write_the_same_records(methods, method):
    """The same flags through pretrain_raptr.py and Megatron-LM's loop: field by field the same
    records (timing aside), the same paths, losses within 1e-5."""
    ours = [json.loads(line) for line in (methods / f"pretrain-raptr-{method}.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (methods / f"megatron-lm-{method}.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs) == 21  # 20 steps, 1 evaluation
    for record, other in zip(ours, theirs):
        assert set(record) == set(other), record
        assert record["method"] == other["method"] == method
        for key, value in record.items():
            if key in ("lm_loss", "val_loss"):
                assert other[key] == pytest.approx(value, abs=1e-5), (key, record)
            elif key in ("grad_norm", "val_ppl"):  # fp32 sums in another order
                assert other[key] == pytest.approx(value, rel=1e-4), (key, record)
            elif key != "elapsed_s":
                assert other[key] == value, (key, record)
    paths = [tuple(r["active_layers"]) for r in ours if "lm_loss" in r]
    if method == "stacking":
        assert paths == [(1, 2)] * 10 + [(1, 2, 3, 4)] * 10
    elif method == "raptr":
        assert [len(path) for path in paths] == [2] * 10 + [4] * 10
    else:
        assert len(set(paths)) > 1


def test_stacking_grows_megatron_lm_model_and_optimizer(methods):
    """Gradual stacking in Megatron-LM's loop resumes exactly across its growth boundary (the checkpoint
    holds layers 3-4 unborn), and continues under TP=2 and PP=2, also with 2 virtual stages per rank
    (growing across them); the distributed optimizer's growth
    (sharded moments) trains as the regular optimizer's."""
    train = lambda name: _records(methods, name)[0]  # noqa: E731
    reference = train("megatron-lm-stacking")
    assert [r["iteration"] for r in train("stacking-first-half")] == list(range(1, 11))
    for name in ("stacking-first-half", "stacking-resumed"):
        for record in train(name):
            assert record == dict(reference[record["iteration"] - 1], elapsed_s=record["elapsed_s"]), name
    assert len(train("stacking-resumed")) == 10
    for name in ("stacking-tp2", "stacking-pp2", "stacking-vpp"):
        continued = train(name)
        assert [r["active_layers"] for r in continued] == [[1, 2, 3, 4]] * 10
        assert [r["lm_loss"] for r in continued] == pytest.approx([r["lm_loss"] for r in reference[10:]], rel=2e-5)
    distributed = train("stacking-distributed-optimizer")
    assert [r["lm_loss"] for r in distributed] == pytest.approx([r["lm_loss"] for r in reference], rel=2e-5)


@pytest.mark.parametrize("flags, settings, message", [
    # Megatron-LM's own checks of the FSDP flags need CUDA: set as they would pass on a GPU.
    ([], {"use_torch_fsdp2": True}, "--use-torch-fsdp2: refused with RaPTr: a skipped layer's parameter shards"),
    ([], {"use_megatron_fsdp": True}, "--use-megatron-fsdp: refused with RaPTr"),
    # Megatron-LM's own checks need Transformer Engine for these: set as they would pass with it.
    ([], {"context_parallel_size": 2}, "--context-parallel-size 2: refused with RaPTr"),
    ([], {"mtp_num_layers": 1}, "--mtp-num-layers 1: refused with RaPTr"),
    (["--spec", "megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"], {},
     "--spec megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec: RaPTr gates TransformerLayer"),
    (["--raptr-schedule", "2@0,5@4"], {}, "--num-layers"),
    (["--cuda-graph-impl", "local"], {}, "--cuda-graph-impl local: refused with RaPTr"),
    (["--enable-cuda-graph"], {}, "--cuda-graph-impl local: refused with RaPTr: .*--enable-cuda-graph"),
    (["--external-cuda-graph"], {}, "--cuda-graph-impl transformer_engine: refused with RaPTr"),
    # The optimizer and precision options pretrain_raptr.py refuses (megatron_raptr/unsupported.py); those
    # Megatron-LM's own checks refuse on the CPU: set as they would pass on a GPU.
    (["--optimizer", "sgd"], {}, "--optimizer sgd: refused with RaPTr"),
    ([], {"optimizer_cpu_offload": True}, "--optimizer-cpu-offload: refused with RaPTr"),
    ([], {"use_precision_aware_optimizer": True}, "--use-precision-aware-optimizer: refused with RaPTr"),
    ([], {"fp8": "hybrid"}, "--fp8-format hybrid: refused with RaPTr"),
])
def test_refuses_what_raptr_cannot_run_before_any_work(flags, settings, message):
    """FSDP would never reduce skipped layers' shards; a hybrid (Mamba) stack's layers cannot be skipped."""
    from megatron.training import global_vars
    from megatron.training.arguments import parse_and_validate_args

    from megatron_raptr import megatron_lm

    sys.argv = [EXAMPLE, *MODEL, "--train-iters", "8", *RAPTR, *flags]
    try:
        args = parse_and_validate_args(extra_args_provider=megatron_lm.add_arguments)
        vars(args).update(settings)
        with pytest.raises(ValueError, match=message):
            megatron_lm.setup(args)
    finally:
        global_vars.unset_global_variables()


def test_virtual_pipeline_stages_continue_a_plain_pipeline_run(tmp_path):
    """PP=2 saved at 4, continued with 2 virtual stages per rank: the plain run's losses (Megatron-LM's
    checkpoint reshards onto the chunks). Balanced paths put one layer in each of the 4 virtual stages."""
    ckpt = str(tmp_path / "ckpt")
    pp2 = ["--pipeline-model-parallel-size", "2", "--raptr-verify-sync", "1"]
    vpp = [*pp2, "--num-virtual-stages-per-pipeline-rank", "2"]
    balanced = ["--num-layers", "8", "--raptr-schedule", "4@0", "--raptr-sampling", "pipeline-balanced",
                "--num-layers-per-virtual-pipeline-stage", "2"]
    ranks = run_distributed(_train_each, 2, [
        _argv(tmp_path, "pp2", *RAPTR, *pp2),
        _argv(tmp_path, "pp2-first-half", *RAPTR, *pp2, "--save", ckpt, "--save-interval", "4", "--exit-interval", "4"),
        _argv(tmp_path, "vpp-resumed", *RAPTR, *vpp, "--load", ckpt),
        _argv(tmp_path, "vpp-balanced", *pp2, *balanced),
    ])
    reference, _ = _records(tmp_path, "pp2")
    resumed, _ = _records(tmp_path, "vpp-resumed")
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    assert [r["active_layers"] for r in resumed] == [r["active_layers"] for r in reference[4:]]
    assert [r["lm_loss"] for r in resumed] == pytest.approx([r["lm_loss"] for r in reference[4:]], rel=2e-5)
    for rank, runs in enumerate(ranks):
        assert runs[2][0]["layers"] == [1 + rank, 3 + rank]  # virtual stage v of rank r: layer 2v + r + 1
        for step, record in zip(runs[2], resumed):
            assert step["with_grad"] == [layer for layer in step["layers"] if layer in record["active_layers"]]
    train, _ = _records(tmp_path, "vpp-balanced")
    assert len({tuple(r["active_layers"]) for r in train}) > 1
    for record in train:
        assert sorted((layer - 1) // 2 for layer in record["active_layers"]) == [0, 1, 2, 3], record


def test_process_group_is_torn_down_before_interpreter_exit(tmp_path):
    """Megatron-LM leaves its process group to interpreter finalization, where gloo's worker threads can
    abort a finished job (SIGABRT); RaPTr's setup tears it down at exit. A probe registered before the
    run sees it gone (atexit runs last in, first out)."""
    code = ("import atexit, runpy, sys, torch.distributed as dist\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
            f"sys.argv = {[EXAMPLE, *_argv(tmp_path, 'run', *RAPTR, iters=4)]!r}\n"
            f"runpy.run_path({EXAMPLE!r}, run_name='__main__')\n"
            "print('initialized after the run:', dist.is_initialized())\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(EXAMPLE).parents[1], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "initialized after the run: True" in result.stdout, result.stdout[-2000:]
    assert "initialized at exit: False" in result.stdout, result.stdout[-2000:]

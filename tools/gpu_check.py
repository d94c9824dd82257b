"""One-command GPU check: the suite's GPU tests, the skip benchmark at a realistic size,
an end-to-end run with a resume, and RaPTr in Megatron-LM's own loop (where megatron.training
is installed), written to DIR/gpu_check.json and DIR/gpu_check.txt.

Without a GPU it says so and runs the same checks at a small size on the CPU.
Run through tools/gpu_check.sh (which can install megatron-core from a wheel directory).
"""

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_skip import report
from plot_metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
GPU_BENCH = ("--layers 24 --path 12 --hidden-size 2048 --seq-length 2048 --micro-batch-size 2 "
             "--vocab-size 32000 --steps 10 --bf16")
CPU_BENCH = "--layers 4 --path 2 --hidden-size 64 --seq-length 64 --micro-batch-size 2 --vocab-size 512 --steps 3"
GPU_RUN = ("--num-layers 8 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 --micro-batch-size 4 "
           "--train-iters 40 --bf16 --vocab-size 32000 --log-interval 10 --eval-interval 20 --eval-iters 2 "
           "--raptr-schedule 4@0,6@0.5,8@0.75")
CPU_RUN = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
           "--train-iters 8 --vocab-size 512 --log-interval 4 --eval-interval 4 --eval-iters 1 "
           "--raptr-schedule 2@0,3@0.5,4@0.75")
RUN_COMMON = ("--lr 3e-4 --lr-warmup-iters 4 --hidden-dropout 0 --attention-dropout 0 --mock-data "
              "--tokenizer-type NullTokenizer")
# RaPTr in Megatron-LM's own loop (megatron-core 0.17+): on a GPU its CUDA paths (NCCL,
# streams, CUDA RNG states), which the CPU compat module stands in for on the CPU.
MEGATRON_LM_GPU = ("--num-layers 8 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 "
                   "--max-position-embeddings 1024 --micro-batch-size 4 --vocab-size 32000 --train-iters 20 "
                   "--eval-interval 10 --raptr-schedule 4@0,8@10")
MEGATRON_LM_CPU = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
                   "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 --vocab-size 512 "
                   "--train-iters 8 --eval-interval 4 --raptr-schedule 2@0,4@4")
MEGATRON_LM_COMMON = ("--lr 1e-3 --lr-warmup-iters 2 --hidden-dropout 0 --attention-dropout 0 --mock-data "
                      "--tokenizer-type NullTokenizer --num-workers 0 --eval-iters 1 --log-interval 4 "
                      "--no-gradient-accumulation-fusion --raptr-sampling fixed-size --raptr-verify-sync 1")


def sh(argv, log, timeout_s):
    """Runs argv, appending its output to log; returns (exit code, seconds); 124 on time-out."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, argv))}\n")
        out.flush()
        # A session of its own, so a time-out stops torchrun's workers too.
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            out.write(f"timed out after {timeout_s} s\n")
            code = 124
        out.write(f"exit code {code} after {time.perf_counter() - start:.1f} s\n")
    return code, time.perf_counter() - start


def run_tests(out_dir, timeout_s):
    log = out_dir / "tests.log"
    code, seconds = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                        "tests/test_layer.py"], log, timeout_s)
    summary = next((line for line in reversed(log.read_text().splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|errors?)", line)), "no pytest summary")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    return {"exit_code": code, "seconds": round(seconds, 1), "summary": summary, **counts}


def run_bench(out_dir, gpu, timeout_s):
    figures = out_dir / "bench.json"
    code, _ = sh([sys.executable, "tools/bench_skip.py", *(GPU_BENCH if gpu else CPU_BENCH).split(),
                  "--json", figures], out_dir / "bench.log", timeout_s)
    return json.loads(figures.read_text()) if code == 0 else {"exit_code": code}


def run_end_to_end(out_dir, gpu, timeout_s):
    """Trains uninterrupted, then the same stopped halfway (checkpoint) and resumed."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "pretrain_raptr.py", *(GPU_RUN if gpu else CPU_RUN).split(), *RUN_COMMON.split()]
    log, work = out_dir / "end_to_end.log", out_dir / "end_to_end"
    iters = int(argv[argv.index("--train-iters") + 1])
    runs = [
        sh(argv + ["--metrics-file", work / "full.jsonl"], log, timeout_s / 3),
        sh(argv + ["--metrics-file", work / "resumed.jsonl", "--save", work / "ckpt", "--exit-interval",
                   str(iters // 2)], log, timeout_s / 3),
        sh(argv + ["--metrics-file", work / "resumed.jsonl", "--save", work / "ckpt", "--load", work / "ckpt"],
           log, timeout_s / 3),
    ]
    codes, seconds = [code for code, _ in runs], [round(s, 1) for _, s in runs]
    if any(codes):
        return {"exit_codes": codes, "seconds": seconds}
    full_run = read_metrics(work / "full.jsonl")
    full, full_eval = full_run["train"], full_run["eval"]
    resumed = read_metrics(work / "resumed.jsonl")["train"]
    pairs = list(zip([r["lm_loss"] for r in full], [r["lm_loss"] for r in resumed]))
    return {
        "exit_codes": codes,
        "seconds": seconds,
        "iterations": len(full),
        "paths_equal_after_resume": [r["active_layers"] for r in full] == [r["active_layers"] for r in resumed],
        "max_rel_loss_diff_after_resume": max(abs(a - b) / abs(a) for a, b in pairs),
        "first_loss": full[0]["lm_loss"],
        "final_loss": full[-1]["lm_loss"],
        "final_val_loss": full_eval[-1]["val_loss"],
    }


def run_megatron_lm(out_dir, gpu, timeout_s):
    """examples/pretrain_gpt_megatron_lm.py: Megatron-LM's pretrain() with RaPTr, one process."""
    try:
        import megatron.training.training  # noqa: F401
    except ImportError:
        return {"skipped": "no megatron.training (megatron-core 0.17+ ships it)"}
    from megatron_raptr import megatron_internals as internals

    metrics = out_dir / "megatron_lm.jsonl"
    # Megatron-LM's default --transformer-impl is transformer_engine; RaPTr builds what it would.
    impl = [] if internals.gpt_specs_have_te.get() else ["--transformer-impl", "local"]
    code, seconds = sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "examples/pretrain_gpt_megatron_lm.py", *(MEGATRON_LM_GPU if gpu else MEGATRON_LM_CPU).split(),
                        *MEGATRON_LM_COMMON.split(), *impl, "--metrics-file", metrics], out_dir / "megatron_lm.log", timeout_s)
    if code:
        return {"exit_code": code, "seconds": round(seconds, 1)}
    run = read_metrics(metrics)
    train, evals = run["train"], run["eval"]
    return {"exit_code": code, "seconds": round(seconds, 1), "path_lengths": [r["path_length"] for r in train],
            "first_loss": train[0]["lm_loss"], "final_loss": train[-1]["lm_loss"],
            "final_val_loss": evals[-1]["val_loss"]}


def environment(gpu):
    import megatron.core

    from megatron_raptr import megatron_internals as internals

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if gpu else "cpu (no CUDA GPU found)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": megatron.core.__version__,
        "python": sys.version.split()[0],
        "transformer_engine": internals.gpt_specs_have_te.get(),
        "apex": internals.gpt_specs_have_apex.get(),
    }


def table(result):
    env, tests, bench, e2e = result["environment"], result["tests"], result["bench"], result["end_to_end"]
    lines = [f"GPU check {env['date']}: {env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | "
             f"megatron-core {env['megatron_core']} | Transformer Engine {env['transformer_engine']} | "
             f"Apex {env['apex']}",
             f"tests: {tests['summary']}"]
    if "raptr" in bench:
        lines.append(report(bench))
    else:
        lines.append(f"benchmark failed: {bench}")
    if "final_loss" in e2e:
        lines.append(f"end to end ({e2e['iterations']} iterations): loss {e2e['first_loss']:.3f} -> "
                     f"{e2e['final_loss']:.3f}, full-model validation {e2e['final_val_loss']:.3f}; resumed halfway: "
                     f"paths equal {e2e['paths_equal_after_resume']}, max relative loss difference "
                     f"{e2e['max_rel_loss_diff_after_resume']:.2e}")
    else:
        lines.append(f"end to end failed: {e2e}")
    megatron_lm = result["megatron_lm"]
    if "final_loss" in megatron_lm:
        lines.append(f"Megatron-LM's loop ({len(megatron_lm['path_lengths'])} iterations, path lengths "
                     f"{sorted(set(megatron_lm['path_lengths']))}): loss {megatron_lm['first_loss']:.3f} -> "
                     f"{megatron_lm['final_loss']:.3f}, full-model validation {megatron_lm['final_val_loss']:.3f}")
    else:
        lines.append(f"Megatron-LM's loop: {megatron_lm}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--timeout-s", type=int, default=150, help="limit for the tests and for the benchmark; twice this for the three end-to-end runs")
    args = parser.parse_args()
    out_dir = Path(args.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if not gpu:
        print("gpu_check: no CUDA GPU found; running the same checks at a small size on the CPU", flush=True)
    result = {"environment": environment(gpu)}
    result["tests"] = run_tests(out_dir, args.timeout_s)
    print(f"tests: {result['tests']['summary']}", flush=True)
    result["bench"] = run_bench(out_dir, gpu, args.timeout_s)
    result["end_to_end"] = run_end_to_end(out_dir, gpu, 2 * args.timeout_s)
    result["megatron_lm"] = run_megatron_lm(out_dir, gpu, args.timeout_s)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    text = table(result)
    (out_dir / "gpu_check.txt").write_text(text + "\n")
    print(text)
    ok = (result["tests"]["exit_code"] == 0 and "raptr" in result["bench"] and "final_loss" in result["end_to_end"]
          and ("final_loss" in result["megatron_lm"] or "skipped" in result["megatron_lm"]))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

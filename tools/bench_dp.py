"""Does data parallelism give back what skipping saves? The share of the skipped layers'
step time that a RaPTr path saves, under DP=1 and DP=2, side by side.

Each setting runs tools/bench_skip.py --full (RaPTr path, dense model of the path's
depth, dense model of all layers, steps interleaved) under torchrun with 1 and with 2
processes; every process gets the same micro-batch (and, on CPU, one thread), so
a rank's compute is the same in both and only the gradient and parameter
communication differ. DP=2 runs once more with --no-raptr-skip-grad-comm, which
reduces every bucket: the difference is what skipping idle buckets buys.

    python tools/bench_dp.py --layers 12 --path 4 --hidden-size 384 --seq-length 64 --micro-batch-size 1
    python tools/bench_dp.py ... --settings distributed-optimizer --json dp.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "ddp": "--overlap-grad-reduce --no-raptr-skip-optimizer-step",
    "distributed-optimizer": "--use-distributed-optimizer --overlap-grad-reduce --no-raptr-skip-optimizer-step",
    # RaPTr's default: skipped layers take no optimizer step, so their buckets need no all-gather either.
    "distopt-skip-opt-step": "--use-distributed-optimizer --overlap-grad-reduce --raptr-skip-optimizer-step",
}
# (processes, extra flags) of each row; DP=1 has no gradient communication to skip.
ROWS = {"DP=1": (1, ""), "DP=2": (2, ""), "DP=2, every bucket reduced": (2, "--no-raptr-skip-grad-comm")}


def bench(nproc, megatron_args, bench_argv, json_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ROOT / "tools" / "bench_skip.py"), *bench_argv, "--full", "--json", json_path,
               f"--megatron-args={megatron_args}"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the same compute per rank at every DP size
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with open(json_path) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other flags go to tools/bench_skip.py (--layers, --path, ...).")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--megatron-args", default="", help="more pretrain_raptr.py flags for every run")
    parser.add_argument("--json", default=None, help="write every run's figures to this file")
    args, bench_argv = parser.parse_known_args(argv)
    results = []
    print(f"{'setting':21s} {'row':28s} {'full ms':>8s} {'raptr ms':>9s} {'dense ms':>9s} {'saved':>6s} "
          f"{'vs DP=1':>8s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            baseline = None
            for row, (nproc, extra) in ROWS.items():
                flags = " ".join(filter(None, (SETTINGS[setting], extra, args.megatron_args)))
                try:
                    result = bench(nproc, flags, bench_argv, os.path.join(tmp, "bench.json"))
                except subprocess.CalledProcessError as error:
                    sys.exit(f"tools/bench_skip.py failed for {setting}, {row}:\n{error.stderr[-4000:]}")
                share = result["step_saved_share"]
                baseline = share if baseline is None else baseline
                results.append(dict(setting=setting, row=row, **result))
                print(f"{setting:21s} {row:28s} {result['full']['step_ms']:8.1f} {result['raptr']['step_ms']:9.1f} "
                      f"{result['dense']['step_ms']:9.1f} {share:6.2f} {100 * (share - baseline):+7.1f}p", flush=True)
    print("saved: share of the skipped layers' step time (full - raptr) / (full - dense) that the path saves; "
          "vs DP=1: its difference in points")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

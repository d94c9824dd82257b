"""Run a test function on several CPU processes (also on GPU machines), as torchrun would launch them.

Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment (so the function can call initialize_distributed()) and one torch
thread per core share. A failing rank fails the caller with that rank's traceback;
a hang fails after `timeout_s` instead of blocking the test run.
"""
import os
import pickle
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp

from megatron_raptr.training.initialize import free_port


def _worker(fn, rank, world_size, port, args, results):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Ranks share the cores; oversubscribed BLAS threads slow every rank down.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        # Plain pickling: queued tensors would otherwise live in this process's shared memory.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size=2, *args, timeout_s=300):
    """Run fn(*args) on `world_size` spawned processes; return the per-rank results.

    fn and its arguments and result must be picklable (fn defined at module level).
    Ranks are not daemonic, so they may start processes of their own.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, results))
        for rank in range(world_size)
    ]
    # Ranks compute on the CPU even where there is a GPU: one GPU cannot host two ranks.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for p in procs:
            p.start()
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    outputs = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{fn.__name__} timed out after {timeout_s} s; "
                    f"ranks without a result: {sorted(set(range(world_size)) - set(outputs))}"
                )
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = {r: p.exitcode for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in outputs}
                # A result may still be in flight from a rank that just exited.
                if dead and results.empty():
                    time.sleep(1.0)
                    if results.empty():
                        raise AssertionError(
                            f"{fn.__name__}: ranks exited without a result: {dead}"
                        )
                continue
            if not ok:
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            outputs[rank] = pickle.loads(value)
    finally:
        # After success ranks exit by themselves, running their exit hooks; after a
        # failure or timeout the others may be blocked in a collective: stop them.
        succeeded = len(outputs) == world_size
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()) if succeeded else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world_size)]

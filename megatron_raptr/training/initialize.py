"""Process-group, model-parallel and RNG initialisation for a torchrun launch.

Uses NCCL and one GPU per process when CUDA is available; otherwise gloo on the
CPU, after megatron_raptr.compat.cpu.install() has adapted Megatron-Core to it.
"""
import atexit
import os
import random
import socket
from datetime import timedelta
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.utils import local_multi_tensor_applier

from megatron_raptr import megatron_internals as internals
from megatron_raptr.compat import torch_adam
from megatron_raptr.compat.torch_norm import SequenceParallelTorchNorm
from megatron_raptr.layer import get_gpt_raptr_layer_spec


def current_device() -> torch.device:
    """The device this process computes on: cuda:LOCAL_RANK, or the CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
) -> None:
    """Join the torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
    build Megatron's model-parallel groups (expert-parallel ones too; virtual pipeline stages:
    the interleaved schedule) and seed every RNG as Megatron-LM does.

    Without torchrun variables it runs as a single process. Idempotent for equal sizes.
    """
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(
            f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
            "must be >= 1"
        )
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) "
            f"x --pipeline-model-parallel-size ({pp}) = {tp * pp}"
        )

    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(current_device())
    else:
        from megatron_raptr.compat import cpu

        cpu.install()
        backend = "gloo"

    if not dist.is_initialized():
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = os.environ.get("MASTER_PORT")
        if port is None:
            if world_size > 1:
                raise RuntimeError("MASTER_PORT is not set: launch with torchrun")
            port = free_port()  # a single process rendezvouses with itself
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
        destroy_at_exit()

    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
        if current != (tp, pp, virtual_pipeline_model_parallel_size):
            raise RuntimeError(
                f"model parallelism already initialised with (tp, pp, virtual pp) = {current}, "
                f"not {(tp, pp, virtual_pipeline_model_parallel_size)}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
        )

    # Megatron-LM: every pipeline stage gets its own seed; the tracker derives the
    # tensor-parallel seed (seed + 2718 + tp_rank) so TP shards initialise differently.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def megatron_fallbacks(unfused: Dict[str, str]) -> List[str]:
    """What Megatron-Core runs in place of Transformer Engine and Apex, where they are not installed,
    and the fusions left out (`unfused`: what is not fused -> why, from model.resolve_fusions)."""
    fallbacks = []
    if not internals.gpt_specs_have_te.get():
        torch_norms = get_gpt_raptr_layer_spec().submodules.input_layernorm is SequenceParallelTorchNorm
        fallbacks.append("local layer spec" + (" with torch norms" if torch_norms else ""))
    if torch_adam.needed():
        fallbacks.append("torch AdamW")
    if internals.multi_tensor_applier.get() is local_multi_tensor_applier:
        fallbacks.append("local multi-tensor kernels")
    reasons = {}
    for fused, why in unfused.items():
        reasons.setdefault(why, []).append(fused)
    fallbacks.extend(f"unfused {', '.join(names)} ({why})" for why, names in reasons.items())
    return fallbacks


def destroy_at_exit() -> None:
    """Tears the process group down at exit while the interpreter is whole: gloo's worker threads, left
    to its finalization, can abort a job that succeeded (SIGABRT, "terminate called without an active
    exception"). Registered once, however many runs a process sets up."""
    atexit.unregister(destroy_distributed)
    atexit.register(destroy_distributed)


def destroy_distributed() -> None:
    """Tear down model-parallel groups and the default process group (at exit; tests call it earlier)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

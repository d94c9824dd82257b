"""Run Megatron-Core on the CPU (gloo backend, no CUDA).

Megatron-Core allocates tensors on `torch.cuda.current_device()` or `device="cuda"`,
calls `torch.cuda.synchronize()`, keeps its RNG tracker states in CUDA generators,
moves tensors with `.cuda()` and checks `tensor.type() == 'torch.cuda.FloatTensor'`.
`install()` adapts exactly those spots:

* the modules in `_MODULES_ASSUMING_CUDA` get their own `torch` whose CUDA device
  is the CPU; torch itself is unchanged for every other module;
* Megatron-LM's loop (`megatron.training`, shipped with megatron-core 0.17+): the
  modules in `_TRAINING_MODULES_ASSUMING_CUDA` get a `torch` that also reports one
  CUDA device, since they refuse to start, or skip building the model-parallel
  groups, without one; their streams, memory statistics and cache are no-ops;
* the Megatron functions in `_patch_tensor_checks` run with CPU tensors passing for
  CUDA ones (`.type()` names, `.cuda()`);
* the RNG tracker and activation recompute keep CPU generator states;
* pipeline sends overlapped with compute (the interleaved schedule) send a copy.

The private or undocumented names patched are reached through megatron_raptr.megatron_internals,
which install() checks first (its CPU group); the public ones are looked up defensively, so a
symbol renamed in a later Megatron-Core release is skipped; the tests show what still runs.
"""
import contextlib
import functools
import importlib
import os
import types

import torch

from megatron_raptr import megatron_internals as internals

_CPU = torch.device("cpu")

# Megatron-Core modules whose own code puts tensors on CUDA, and where.
_MODULES_ASSUMING_CUDA = {
    # GlobalMemoryBuffer.get_tensor (DotProductAttention's score buffer) on current_device().
    "megatron.core.utils",
    # forward_backward_* count tokens in torch.zeros(..., device="cuda").
    "megatron.core.pipeline_parallel.schedules",
    # Receive buffers and shape exchange on current_device(); synchronize() after batched p2p.
    "megatron.core.pipeline_parallel.p2p_communication",
    # DDP's contiguous grad (and distributed-optimizer param) buffers on current_device().
    "megatron.core.distributed.param_and_grad_buffer",
    # FP32Optimizer / MixedPrecisionOptimizer loss-scale and overflow tensors on 'cuda'.
    "megatron.core.optimizer.optimizer",
    # Grad-norm buffers on 'cuda'.
    "megatron.core.optimizer.clip_grads",
    # fp16 loss scale on 'cuda'.
    "megatron.core.optimizer.grad_scaler",
    # get_default_causal_mask on 'cuda'.
    "megatron.core.transformer.utils",
    # RoPE moves inv_freq to current_device() on every forward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # MoE router: its weights moved to current_device() at the first forward, aux-loss statistics there.
    "megatron.core.transformer.moe.router",
    # Weights on current_device() unless config.use_cpu_initialization.
    "megatron.core.tensor_parallel.layers",
    # Sequence-parallel gather / reduce-scatter outputs on current_device().
    "megatron.core.tensor_parallel.mappings",
    # torch_dist checkpoint writer: synchronize() before writing, save status in CUDA tensors.
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # Async save: synchronize() before forking the writer, completion flags on current_device().
    "megatron.core.dist_checkpointing.strategies.async_utils",
    # Fully parallel load: synchronize() after the exchange, whose buffers are made on "cuda".
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
}

# Megatron-Core modules that also need CUDA streams (no-ops on the CPU).
_MODULES_USING_CUDA_STREAMS = {
    # The all-to-all MoE token dispatcher copies its token counts to the host on a stream of its own.
    "megatron.core.transformer.moe.token_dispatcher",
}

# Megatron-LM's loop: modules that also need to see a CUDA device.
_TRAINING_MODULES_ASSUMING_CUDA = {
    # initialize_megatron asserts CUDA; model-parallel groups and the RNG tracker's seeds are
    # set up only when torch.cuda.device_count() > 0; JIT warm-up tensors on 'cuda'.
    "megatron.training.initialize",
    # pretrain/train/evaluate: start-time, loss and flag tensors on 'cuda', a CUDA stream
    # around DDP construction (get_model), memory statistics in the log, empty_cache().
    "megatron.training.training",
    # The model builder (0.19's config path): the same stream, and the model moved to current_device().
    "megatron.training.models.dist_utils",
    # Loss averaging across data-parallel ranks and the grad-norm/params-norm helpers.
    "megatron.training.utils.common_utils",
    "megatron.training.utils.utils",
    # Checkpoint save/load: RNG states and the iteration tensor.
    "megatron.training.checkpointing",
    # The loop's timers synchronize CUDA before reading the clock.
    "megatron.core.timers",
    # Saves and restores the CUDA RNG state around every step, to rerun it if asked.
    "megatron.core.rerun_state_machine",
}

# Tensor-type names Megatron's optimizer accepts, keyed by their CPU counterparts.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}

# Why Megatron-LM's fusions (model.FUSIONS) are off without CUDA: their kernels are CUDA
# extensions or torch.compile'd for the GPU.
NO_FUSED_KERNELS = "needs CUDA"

# --num-workers without CUDA: loader processes would compete with training for the same cores
# (and be forked again for every evaluation), so batches are made in the training process.
DATA_LOADER_WORKERS = 0

_installed = False
_training_installed = False


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError:  # moved or removed in another Megatron-Core release
        return None


def _on_cpu(device):
    """A CUDA device spec ("cuda", "cuda:N", torch.device) becomes the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        return _CPU
    return device


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` whose current device is the CPU and whose synchronize is a no-op.

    With `device_present`, it also reports one CUDA device (the CPU) with no-op streams,
    device selection, cache and empty memory statistics, and the CPU's RNG state.
    """

    def __init__(self, device_present=False):
        super().__init__("torch.cuda")
        if device_present:
            self.is_available = lambda: True
            self.device_count = lambda: 1
            self.set_device = lambda device: None
            self.empty_cache = lambda: None
            self.memory_stats = lambda device=None: {}
            self.Stream = lambda *args, **kwargs: _NoStream()
            self.stream = lambda stream: contextlib.nullcontext()
            # The CPU generator stands in for the CUDA one (what the RNG tracker does too).
            self.get_rng_state = lambda device="cuda": torch.get_rng_state()
            self.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
            # No CUDA architecture: Megatron-LM's argument checks branch on it.
            self.get_device_properties = lambda device=None: types.SimpleNamespace(
                name="cpu", major=0, minor=0, total_memory=0)
            self.get_device_capability = lambda device=None: (0, 0)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):
        """CPU kernels and gloo collectives have completed when they return."""

    @staticmethod
    def current_stream(device=None):
        # Megatron-Core 0.17+ waits on CUDA-graph events in DDP's start_grad_sync.
        return _NoStream()


class _NoStream:
    """The CPU's one implicit stream: there is never anything to wait for."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self):
        return self  # an event that has happened: synchronize() returns at once

    def synchronize(self):
        pass


class _TorchOnCpu(types.ModuleType):
    """`torch` whose tensor factories put `device="cuda"` on the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "empty_like", "full", "rand")

    def __init__(self, device_present=False):
        super().__init__("torch")
        self.cuda = _CudaOnCpu(device_present)
        for name in self._FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        @functools.wraps(fn)
        def on_cpu(*args, device=None, **kwargs):
            return fn(*args, device=_on_cpu(device), **kwargs)

        return on_cpu

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _cpu_tensors_as_cuda():
    """Within the block CPU tensors pass for CUDA ones: `tensor.type()` reports float
    types by their CUDA names and `tensor.cuda()` leaves the tensor where it is.
    (torch.Tensor is patched for the block's duration; Megatron calls these on the
    main thread.)"""
    base_type = torch._C.TensorBase.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = base_type(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return base_type(self, dtype, non_blocking, **kwargs)

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    saved = {name: vars(torch.Tensor).get(name) for name in ("type", "cuda")}
    torch.Tensor.type, torch.Tensor.cuda = type_, cuda
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def _as_cuda(fn):
    """fn, run with CPU tensors passing for CUDA ones."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_as_cuda():
            return fn(*args, **kwargs)

    return wrapper


def _patch_tensor_checks():
    language_module = _import("megatron.core.models.common.language_module.language_module")
    clip_grads = _import("megatron.core.optimizer.clip_grads")

    # Tied embeddings under PP: first and last stage all-reduce `weight.data.cuda()`.
    cls = getattr(language_module, "LanguageModule", None)
    if hasattr(cls, "setup_embeddings_and_output_layer"):
        cls.setup_embeddings_and_output_layer = _as_cuda(cls.setup_embeddings_and_output_layer)

    # clip_grad_by_total_norm_fp32 asserts param.grad.type() == 'torch.cuda.FloatTensor';
    # optimizer.py imported it by name, so that reference is replaced too.
    original = getattr(clip_grads, "clip_grad_by_total_norm_fp32", None)
    if original is not None:
        clip_grads.clip_grad_by_total_norm_fp32 = _as_cuda(original)
        if internals.optimizer_clip_grad_by_total_norm_fp32.get() is original:
            internals.optimizer_clip_grad_by_total_norm_fp32.replace(clip_grads.clip_grad_by_total_norm_fp32)

    # DistributedOptimizer sorts params into fp32 / fp16 groups by model_param.type().
    build_groups = internals.build_model_and_main_param_groups
    build_groups.replace(classmethod(_as_cuda(build_groups.get().__func__)))

    # Float16OptimizerWithFloat16Params (bf16 / fp16) sorts params by param.type().
    cls = getattr(_import("megatron.core.optimizer.optimizer"), "Float16OptimizerWithFloat16Params", None)
    if cls is not None:
        cls.__init__ = _as_cuda(cls.__init__)

    # Fully parallel checkpoint load moves the shards it read with `tensor.cuda()` before
    # exchanging them, and makes receive buffers with ShardedTensor.init_data("cuda").
    internals.exchange_by_distribution.replace(_as_cuda(internals.exchange_by_distribution.get()))
    mapping = _import("megatron.core.dist_checkpointing.mapping")
    cls = getattr(mapping, "ShardedTensor", None)
    if hasattr(cls, "init_data"):
        init_data = cls.init_data
        cls.init_data = lambda self, device, *args, **kwargs: init_data(self, _on_cpu(device), *args, **kwargs)


def _patch_rng():
    default_name = internals.model_parallel_rng_tracker_name.get()

    class CpuRNGStatesTracker(internals.cuda_rng_states_tracker.get()):
        """Megatron's RNG tracker over CPU generator states: add() and fork() of the
        CUDA tracker read and write torch.cuda RNG states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=default_name):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    # initialize_rng_tracker() instantiates whatever this module-level name refers to.
    internals.cuda_rng_states_tracker.replace(CpuRNGStatesTracker)

    # Activation recompute (tensor_parallel.checkpoint) saves and restores the CUDA RNG.
    internals.get_cuda_rng_state.replace(lambda *args, **kwargs: torch.get_rng_state())
    internals.set_cuda_rng_state.replace(lambda state, *args, **kwargs: torch.set_rng_state(state))


def _patch_moe_host_copies():
    """The all-to-all MoE dispatcher copies its split sizes to the host as numpy arrays, which
    all_to_all_single takes; Megatron copies only CUDA tensors, so on the CPU they stayed tensors."""
    to_host = internals.maybe_move_tensor_to_cpu.get()

    @functools.wraps(to_host)
    def to_host_on_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_host(tensor, as_numpy, record_stream)

    internals.maybe_move_tensor_to_cpu.replace(to_host_on_cpu)


def _patch_overlapped_p2p_sends() -> None:
    """The interleaved schedule, overlapping p2p with compute, frees a sent output's storage
    (deallocate_output_tensor) before it waits for the send. On a GPU the caching allocator
    orders that after the send on its stream; gloo reads the memory in the background, from
    then on freed. The send's pending work keeps a copy alive instead."""
    original = internals.p2p_ops.get()

    @functools.wraps(original)
    def p2p_ops(*, tensor_send_prev, tensor_send_next, **kwargs):
        return original(tensor_send_prev=None if tensor_send_prev is None else tensor_send_prev.clone(),
                        tensor_send_next=None if tensor_send_next is None else tensor_send_next.clone(), **kwargs)

    internals.p2p_ops.replace(p2p_ops)


def install() -> None:
    """Adapt Megatron-Core to the CPU. Idempotent. Call before seeding Megatron's RNG
    tracker (initialize_distributed does), and only without CUDA."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_raptr.compat.cpu.install() is for machines without CUDA")
    internals.check(internals.CPU)
    _redirect(_MODULES_ASSUMING_CUDA, _TorchOnCpu())
    _redirect(_MODULES_USING_CUDA_STREAMS, _TorchOnCpu(device_present=True))
    _patch_tensor_checks()
    _patch_rng()
    _patch_moe_host_copies()
    _patch_overlapped_p2p_sends()
    _installed = True


def install_megatron_training() -> None:
    """install(), and adapt Megatron-LM's loop (`megatron.training`) too. Idempotent.
    Call before Megatron-LM validates its arguments: that already asks for the GPU.

    Separate from install() because importing megatron.training is slow and only
    programs that run Megatron-LM's own loop need it.
    """
    global _training_installed
    install()
    if _training_installed:
        return
    _redirect(_TRAINING_MODULES_ASSUMING_CUDA, _TorchOnCpu(device_present=True))
    # Megatron-LM requires this for tensor parallelism on GPUs older than Blackwell, which the
    # CPU stand-in reports; it only orders CUDA kernel launches.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # Megatron's fused kernels are torch.compile'd; on the CPU, compiling them (the loop warms
    # them up at start) takes about half a minute per process, for no gain: run them eagerly.
    torch._dynamo.config.disable = True
    # The fusions' warm-up draws its random inputs from CUDA's generator on a GPU; here from the one
    # that then initializes the weights, which would differ from a GPU run's and pretrain_raptr.py's.
    internals.check(internals.MEGATRON_LM)
    warm_up = internals.jit_fusion_warm_up.get()

    @functools.wraps(warm_up)
    def warm_up_leaving_rng_alone(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return warm_up(*args, **kwargs)

    internals.jit_fusion_warm_up.replace(warm_up_leaving_rng_alone)
    _training_installed = True


def adapt_megatron_training_args(args) -> None:
    """Megatron-LM's parsed arguments `args` for the CPU; before the model's config is built."""
    # gloo, as our own trainer uses without CUDA; weights made where they stay (the model
    # builder would otherwise move them with Module.cuda(), which only takes CUDA devices).
    args.distributed_backend = "gloo"
    args.use_cpu_initialization = True
    args.gradient_accumulation_fusion = False  # a CUDA extension (Apex or Transformer Engine)
    args.apply_rope_fusion = False  # Transformer Engine's kernel (on by default in Megatron-LM)
    # Transformer Engine's layers and Apex's persistent layer norm need CUDA; Megatron's torch norms
    # refuse the latter (on by default in Megatron-LM).
    args.transformer_impl = "local"
    args.no_persist_layer_norm = True


def _redirect(module_names, cpu_torch) -> None:
    for name in module_names:
        module = _import(name)
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch

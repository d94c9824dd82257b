"""Mixture of experts under RaPTr: a path of an MoE GPT is the MoE GPT of exactly its layers (loss,
gradients, auxiliary losses), and pretrain_raptr.py trains MoE models under expert, tensor and data
parallelism (2 gloo processes) and resumes them exactly."""

import dataclasses

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from torch.utils.flop_counter import FlopCounterMode

from megatron_raptr import PathSetter, get_gpt_raptr_block_spec
from megatron_raptr.flops import step_flops
from megatron_raptr.moe import step_aux_losses
from megatron_raptr.sampler import Path
from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed
from tests.dense_reference import active_layers_state_dict
from tests.test_pretrain import MODEL, records, run_distributed, _pretrain_each

moe_logging = pytest.importorskip("megatron.core.transformer.moe.moe_logging",
                                  reason="MoE metrics need megatron-core's MoE metrics tracker (0.19)")

VOCAB, SEQ, BATCH = 256, 32, 2
PATTERN = [1, 0, 1, 1]  # --moe-layer-freq: layer 2 dense
ACTIVE = (1, 2, 4)  # MoE layer 3 skipped


@pytest.fixture()
def single_process_megatron():
    initialize_distributed(1, 1, seed=7)
    yield
    destroy_distributed()


def moe_config(num_layers, pattern):
    return TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0, use_cpu_initialization=True, num_moe_experts=4,
                             moe_router_topk=2, moe_layer_freq=pattern, moe_aux_loss_coeff=0.01,
                             moe_z_loss_coeff=0.001, add_bias_linear=False)


def forward_backward(model):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach()


def test_path_equals_the_moe_gpt_of_exactly_its_layers(single_process_megatron):
    """Same loss, gradients (auxiliary losses included) and logged auxiliary losses (averaged over the MoE
    layers that ran) as a plain Megatron MoE GPT of the path's layers; the skipped MoE layer runs nothing:
    no gradient, no logged loss, no FLOPs."""
    tracker = moe_logging.get_moe_metrics_tracker()
    tracker.clear()
    config = moe_config(4, PATTERN)
    torch.manual_seed(0)
    raptr = GPTModel(config, get_gpt_raptr_block_spec(config, use_transformer_engine=False), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    dense_config = moe_config(len(ACTIVE), [PATTERN[layer - 1] for layer in ACTIVE])
    dense = GPTModel(dense_config, get_gpt_decoder_block_spec(dense_config, use_transformer_engine=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ)
    dense.load_state_dict(active_layers_state_dict(raptr.state_dict(), ACTIVE))

    PathSetter(raptr)(Path(0, 0, ACTIVE, {layer: 1.0 for layer in ACTIVE}))
    with FlopCounterMode(display=False) as counter:
        raptr_loss = forward_backward(raptr)
    raptr_aux = step_aux_losses(config, ACTIVE, num_microbatches=1)
    dense_loss = forward_backward(dense)
    dense_aux = step_aux_losses(dense_config, range(1, len(ACTIVE) + 1), num_microbatches=1)

    torch.testing.assert_close(raptr_loss, dense_loss, rtol=1e-6, atol=0)
    assert set(raptr_aux) == {"load_balancing_loss", "z_loss"}
    assert raptr_aux == pytest.approx(dense_aux, rel=1e-6)
    raptr_params = dict(raptr.named_parameters())
    dense_grads = active_layers_state_dict({name: p.grad for name, p in raptr_params.items()}, ACTIVE)
    for name, param in dense.named_parameters():
        torch.testing.assert_close(dense_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    skipped = [param for name, param in raptr_params.items() if name.startswith("decoder.layers.2.")]
    assert skipped and all(param.grad is None for param in skipped)
    # The FLOPs accounting (router, top-k experts) agrees with an independent count of every matmul.
    assert counter.get_total_flops() == step_flops(config, VOCAB, SEQ, BATCH * SEQ, ACTIVE)


def test_skipped_layers_expert_bias_is_not_updated(single_process_megatron):
    """Aux-loss-free balancing: the skipped MoE layer's router counts no tokens, and Megatron's update of
    the expert bias (a step by the sign of each expert's distance to the mean count) leaves it as it is."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    config = dataclasses.replace(moe_config(4, PATTERN), moe_router_enable_expert_bias=True,
                                 moe_router_score_function="sigmoid")
    model = GPTModel(config, get_gpt_raptr_block_spec(config, use_transformer_engine=False), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    PathSetter(model)(Path(0, 0, ACTIVE, {layer: 1.0 for layer in ACTIVE}))
    forward_backward(model)
    routers = {layer.layer_number: layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")}
    assert {number: bool(router.local_tokens_per_expert.any()) for number, router in routers.items()} == {
        1: True, 3: False, 4: True}
    skipped = routers[3]
    updated = get_updated_expert_bias(skipped.local_tokens_per_expert.clone(), skipped.expert_bias, 1e-3)
    assert torch.equal(updated, skipped.expert_bias)


def test_moe_flops_count_the_router_and_the_top_k_experts():
    config = moe_config(4, PATTERN)
    h, ffn, experts, k = 64, config.moe_ffn_hidden_size, 4, 2

    def flops(layers):
        return step_flops(config, VOCAB, SEQ, 1, layers)

    dense_layer, moe_layer = flops([2]) - flops([]), flops([1]) - flops([])
    assert moe_layer - dense_layer == 3 * 2 * (h * experts + (k - 1) * 2 * h * ffn)  # router, one more expert
    assert flops(ACTIVE) == flops([]) + 2 * moe_layer + dense_layer
    assert flops(4) == flops([1, 2, 3, 4])  # a number of layers: the model's mean layer


MOE = ["--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
       "--moe-layer-freq", "([1,0,1,1])", "--raptr-schedule", "2@0,3@0.5", "--raptr-sampling", "fixed-size",
       "--raptr-verify-sync", "1"]


def _load_full_state(model, full):
    """Copy a one-rank MoE GPT's parameters into this rank's shards: its experts (expert-parallel rank)
    and tensor-parallel slices."""
    from megatron.core import parallel_state as ps

    local_experts = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    for name, param in model.named_parameters():
        parts = name.split(".")
        expert = "local_experts" in parts
        if expert:
            index = parts.index("local_experts") + 1
            parts[index] = str(ps.get_expert_model_parallel_rank() * local_experts + int(parts[index]))
        value = full[".".join(parts)]
        if getattr(param, "tensor_model_parallel", False):
            size, rank = ((ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()) if expert
                          else (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()))
            value = value.chunk(size, dim=param.partition_dim)[rank]
        with torch.no_grad():
            param.copy_(value)


def _train_from_one_start(argvs):
    """Trains each argv with the trainer from the first one's initial weights (Megatron initialises
    experts on RNG streams per expert-parallel rank, so layouts would otherwise start apart)."""
    from megatron.core import parallel_state

    from megatron_raptr.training.arguments import parse_args
    from megatron_raptr.training.loop import TrainState, build_trainer

    full = None
    for argv in argvs:
        args = parse_args(argv, world_size=2)
        initialize_distributed(args.tensor_model_parallel_size, 1, args.seed, 10, args.expert_model_parallel_size,
                               args.expert_tensor_parallel_size)
        trainer, tokenizer = build_trainer(args)
        module = trainer.model[0].module
        if full is None:
            full = {name: param.detach().clone() for name, param in module.named_parameters()}
        _load_full_state(module, full)
        train, valid = trainer.family.build_datasets(args, tokenizer)
        trainer.train(TrainState(), train, {None: valid}, None)
        trainer.runtime.metrics.close()
        parallel_state.destroy_model_parallel()


def _moe_jobs(same_start, pretrain, refused):
    """Returns the error resuming each of `refused` stops with."""
    from megatron.core import parallel_state

    from megatron_raptr.training.loop import TrainingStopped

    _train_from_one_start(same_start)
    _pretrain_each(pretrain)
    errors = []
    for argv in refused:
        with pytest.raises(TrainingStopped) as error:
            _pretrain_each([argv])
        parallel_state.destroy_model_parallel()
        errors.append(str(error.value))
    return errors


def test_expert_tensor_and_data_parallel_moe_runs_agree_and_resume_exactly(tmp_path):
    """On 2 processes, from the same weights: EP=2 (all-to-all dispatch, distributed optimizer, overlapped
    reduction) trains the paths of EP=1 with the same losses (within 1e-5 relative), and so does TP=2; pretrain_raptr.py at EP=2 saved at
    iteration 4 and resumed repeats the uninterrupted run. Resumed without expert parallelism it stops, naming
    --load and the expert-parallel flags, before it trains: its optimizer state is saved in two parts."""
    ckpt = str(tmp_path / "ckpt")
    ep2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
           "--use-distributed-optimizer", "--overlap-grad-reduce"]
    same_start = {"ep1": [], "ep2": ep2, "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"]}
    pretrain = {"uninterrupted": ep2, "first-half": ep2 + ["--save", ckpt, "--save-interval", "4", "--exit-interval", "4"],
                "resumed": ep2 + ["--load", ckpt]}

    def argvs(runs):
        return [MODEL + MOE + ["--train-iters", "8", "--metrics-file", str(tmp_path / f"{name}.jsonl")] + extra
                for name, extra in runs.items()]

    errors = run_distributed(_moe_jobs, 2, argvs(same_start), argvs(pretrain),
                             argvs({"ep1-resumed": ["--use-distributed-optimizer", "--load", ckpt]}), timeout_s=600)
    for (error,) in errors:
        assert f"--load {ckpt}" in error and "holds the state of 2 optimizer(s), this run builds 1" in error
        assert "--expert-model-parallel-size" in error
    assert not (tmp_path / "ep1-resumed.jsonl").exists() or not records(tmp_path, "ep1-resumed")
    train = {name: [r for r in records(tmp_path, name) if "lm_loss" in r] for name in {**same_start, **pretrain}}
    paths = [r["active_layers"] for r in train["ep1"]]
    assert len({tuple(path) for path in paths[4:]}) > 1  # the second stage samples
    for name in ("ep2", "tp2"):
        assert [r["active_layers"] for r in train[name]] == paths, name
        assert [r["lm_loss"] for r in train[name]] == pytest.approx([r["lm_loss"] for r in train["ep1"]], rel=1e-5)
    assert all(r["load_balancing_loss"] > 0 and r["z_loss"] > 0 for r in train["ep2"])
    assert [r["iteration"] for r in train["resumed"]] == [5, 6, 7, 8]
    for key in ("active_layers", "lm_loss", "load_balancing_loss", "z_loss", "cumulative_flops"):
        assert [r[key] for r in train["first-half"] + train["resumed"]] == [r[key] for r in train["uninterrupted"]], key


def _expert_buckets_reduced():
    """Per step of 2 paths: the expert-parallel bucket groups all-reduced, those with a parameter on the
    path, and the number of groups. TP=2 with experts unsplit (--expert-tensor-parallel-size 1): the
    experts' gradients live in expert-parallel buffers, reduced over an expert data-parallel group of 2."""
    from megatron.core.distributed import param_and_grad_buffer

    from megatron_raptr import RaptrDistributedDataParallel
    from tests import tiny_gpt

    initialize_distributed(2, 1, seed=3, expert_tensor_parallel_size=1)
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=PATTERN, add_bias_linear=False,
               expert_tensor_parallel_size=1, sequence_parallel=True, use_cpu_initialization=True)
    spec_config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=2,
                                    **moe)
    model, config = tiny_gpt.build_gpt(layer_spec=get_gpt_raptr_block_spec(spec_config, use_transformer_engine=False),
                                       **moe)
    ddp, optimizer = tiny_gpt.wrap(model, config, ddp_class=RaptrDistributedDataParallel)
    groups = ddp.expert_parallel_bucket_groups
    group_of = {bucket.grad_data.data_ptr(): i for i, group in enumerate(groups) for bucket in group.buckets}
    set_path = PathSetter(ddp)
    paths, reduced, expected = [(1, 2, 4), (2, 3)], [], []

    def before_step(step):
        set_path(Path(step, 0, paths[step], {}))
        skipped = set(ddp.skipped_parameters)
        expected.append({i for i, group in enumerate(groups) if not group.params <= skipped})
        reduced.append(set())

    def recorded(*args, **kwargs):
        reduced[-1].add(group_of.get(args[0].data_ptr()))
        return all_reduce(*args, **kwargs)

    all_reduce = torch.distributed.all_reduce
    param_and_grad_buffer.torch.distributed.all_reduce = recorded
    try:
        tiny_gpt.train(ddp, optimizer, config, tiny_gpt.global_batch(), len(paths), before_step)
    finally:
        param_and_grad_buffer.torch.distributed.all_reduce = all_reduce
    destroy_distributed()
    return [r - {None} for r in reduced], expected, len(groups)


def test_skipped_layers_expert_buckets_are_not_reduced():
    for reduced, expected, num_groups in run_distributed(_expert_buckets_reduced, 2):
        assert num_groups == 3  # one per MoE layer
        assert reduced == expected == [{0, 2}, {1}]  # groups in backward order: layers 4, 3, 1

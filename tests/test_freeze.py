"""What a step does to skipped layers: a zero-gradient Adam step, or nothing (--raptr-freeze-skipped)."""

import pytest
import torch
from megatron.core import parallel_state

from megatron_raptr.freeze import _main_parameters
from megatron_raptr.training import data
from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed
from megatron_raptr.training.loop import Trainer, TrainState
from megatron_raptr.training.model import build_model, build_optimizer, transformer_config
from megatron_raptr.training.tokenizer import build_tokenizer

# Stage 0 trains every layer (so all have Adam state), stage 1 only the fixed layers 1 and 4.
ARGS = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--train-iters 4 --lr 1e-2 --mock-data --tokenizer-type NullTokenizer --vocab-size 200 "
        "--raptr-schedule 4@0,2@2").split()


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    initialize_distributed(1, 1, seed=5)
    yield
    destroy_distributed()


def snapshot(model, optimizer, layer_numbers):
    mains = {}
    for inner in optimizer.chained_optimizers:
        mains.update(_main_parameters(inner))
    inner_state = {k: v for inner in optimizer.chained_optimizers for k, v in inner.optimizer.state.items()}
    params = [p for layer in model[0].module.decoder.layers if layer.layer_number in layer_numbers
              for p in layer.parameters()]
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in inner_state[mains[p]].items()} for p in params])


def states_equal(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("distributed_optimizer", [False, True])
@pytest.mark.parametrize("freeze", [False, True])
def test_skipped_layers_step(freeze, distributed_optimizer):
    argv = ARGS + (["--raptr-freeze-skipped"] if freeze else []) + (
        ["--use-distributed-optimizer"] if distributed_optimizer else [])
    args = parse_args(argv)
    parallel_state.destroy_model_parallel()
    initialize_distributed(1, 1, seed=5)
    tokenizer = build_tokenizer(args)
    config = transformer_config(args)
    model = build_model(args, config, tokenizer.vocab_size)
    optimizer, scheduler = build_optimizer(args, config, model)
    trainer = Trainer(args, config, model, optimizer, scheduler, tokenizer.vocab_size, hooks=[])
    train, _ = data.build_datasets(args, tokenizer)
    batches = data.build_data_iterator(train, args.micro_batch_size, 0, 1, consumed_samples=0)
    state = TrainState()
    for _ in range(2):
        trainer.train_step(state, batches)
    skipped_before, skipped_state_before = snapshot(model, optimizer, (2, 3))
    kept_before, _ = snapshot(model, optimizer, (1, 4))
    for _ in range(2):
        assert trainer.train_step(state, batches)["active_layers"] == [1, 4]
    skipped_after, skipped_state_after = snapshot(model, optimizer, (2, 3))
    kept_after, _ = snapshot(model, optimizer, (1, 4))

    assert not any(torch.equal(a, b) for a, b in zip(kept_before, kept_after))
    unchanged = [torch.equal(a, b) for a, b in zip(skipped_before, skipped_after)]
    if freeze:
        assert all(unchanged)
        assert states_equal(skipped_state_before, skipped_state_after)
    else:  # momentum and weight decay keep moving them
        assert not any(unchanged)
        assert not states_equal(skipped_state_before, skipped_state_after)

"""Gradual stacking in the trainer (one process): growth copies exactly the right weights, main
weights and optimizer state, only at the boundary; the new layers train from then on; evaluation
runs the layers that exist. Under Megatron's fp32, bf16 and distributed optimizers."""

import pytest
import torch
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from megatron_raptr.training import data
from megatron_raptr.training.loop import TrainState
from tests.dense_reference import active_layers_state_dict
from tests.test_trainer import build, mean_loss, microbatches, plain_gpt, single_process_megatron  # noqa: F401

STACKING = ["--stacking-schedule", "2@0,4@2", "--train-iters", "4"]


def layer_state(trainer, layer):
    """{name: (model weight, fp32 main weight, {moment: tensor})} of a 1-based layer, copied;
    read from the optimizer without the growth module's help."""
    gpt = unwrap_model(trainer.model)[0]
    state = {}
    for name, param in gpt.decoder.layers[layer - 1].named_parameters():
        sub = trainer.optimizer.chained_optimizers[0]
        if isinstance(sub, DistributedOptimizer):
            tensors = sub._get_main_param_and_optimizer_states(param)
            main = tensors.pop("param")
        else:
            main = getattr(param, "main_param", None)
            main = param if main is None else main
            tensors = sub.optimizer.state[main]
        moments = {k: v.clone() for k, v in tensors.items() if k != "step"}
        assert set(moments) == {"exp_avg", "exp_avg_sq"}
        state[name] = (param.detach().clone(), main.detach().clone().view_as(param), moments)
    return state


def grow_at(trainer, iteration):
    runtime = trainer.runtime
    for hook in runtime.hooks:
        hook.on_stage_start(runtime.schedule, runtime.schedule.stage_index(iteration), iteration)


@pytest.mark.parametrize("extra", [[], ["--bf16", "--stacking-optimizer-state", "copy"],
                                   ["--bf16", "--use-distributed-optimizer", "--stacking-optimizer-state", "copy"]],
                         ids=["fp32-fresh", "bf16-copy", "distributed-optimizer-copy"])
def test_growth_copies_the_top_layers_at_the_boundary_only(extra):
    args, trainer, train, _ = build(*STACKING, *extra)
    copy_moments = "copy" in extra
    state, iterator = TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0)
    records = [trainer.train_step(state, iterator) for _ in range(2)]
    assert [r["active_layers"] for r in records] == [[1, 2], [1, 2]]
    before = {layer: layer_state(trainer, layer) for layer in range(1, 5)}
    grow_at(trainer, 1)  # inside stage 0: nothing happens
    assert all(torch.equal(layer_state(trainer, 3)[n][0], before[3][n][0]) for n in before[3])

    grow_at(trainer, 2)
    after = {layer: layer_state(trainer, layer) for layer in range(1, 5)}
    for target, source in ((3, 1), (4, 2), (1, 1), (2, 2)):
        for name, (weight, main, moments) in after[target].items():
            src_weight, src_main, src_moments = before[source][name]
            assert torch.equal(weight, src_weight), (target, name)
            assert torch.equal(main, src_main), (target, name)
            for key, value in moments.items():
                if target in (3, 4) and not copy_moments:
                    assert not value.any(), (target, name, key)  # fresh: zero moments
                else:
                    assert torch.equal(value, src_moments[key]), (target, name, key)
                    assert value.any(), (target, name, key)

    record = trainer.train_step(state, iterator)
    assert record["active_layers"] == [1, 2, 3, 4] and record["path_length"] == 4
    trained = layer_state(trainer, 3)
    assert all(not torch.equal(trained[n][1], after[3][n][1]) for n in trained)  # the new layers train
    grow_at(trainer, 3)  # entering stage 1 later (a resumed run) must not grow again
    assert all(torch.equal(layer_state(trainer, 3)[n][1], trained[n][1]) for n in trained)


def test_stacking_evaluates_the_layers_that_exist():
    args, trainer, train, valid = build(*STACKING)
    trainer.train_step(TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0))
    assert trainer.runtime.evaluated_layers() == [1, 2]
    weights = {name: value for name, value in unwrap_model(trainer.model)[0].state_dict().items()}
    dense = plain_gpt(trainer, args, 2).eval()
    dense.load_state_dict(active_layers_state_dict(weights, [1, 2]))
    with torch.no_grad():
        expected = mean_loss(dense, microbatches(args, valid, args.eval_iters * args.num_microbatches))
    assert trainer.evaluate(valid) == pytest.approx(expected, rel=1e-6)

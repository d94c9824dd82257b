"""Adam's step count per layer: a layer that joins the path late takes exactly the first step of a
fresh per-parameter torch AdamW on the same gradient, under each optimizer Megatron builds on the
CPU (fp32, bf16 with fp32 main weights, distributed, distributed bf16), with and without
--raptr-skip-optimizer-step (and with --raptr-catch-up-weight-decay: after the weight decay it missed), in a run that went on and in one resumed from a checkpoint before the
join. 2 gloo processes (DP=2) drive pretrain_raptr's trainer step by step.
"""
import pytest

from tests.distributed import run_distributed
from tests.test_pretrain import MODEL

JOIN = 12  # layers 2 and 3 are off the path before this step (beta2 0.999: a shared count is far off)
FLAGS = ["--raptr-schedule", f"2@0,4@{JOIN}", "--raptr-fixed-layers", "1", "4", "--train-iters", str(JOIN + 1),
         "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--adam-beta2", "0.999", "--weight-decay", "0.1",
         "--clip-grad", "0"]
OPTIMIZERS = {"fp32": [], "bf16": ["--bf16"], "distopt": ["--use-distributed-optimizer"],
              "distopt-bf16": ["--use-distributed-optimizer", "--bf16"]}
MODES = {"frozen": [], "stepped": ["--no-raptr-skip-optimizer-step"], "catch-up": ["--raptr-catch-up-weight-decay"]}


def _probe_join_step(trainer):
    """Wraps the optimizer steps to record, for layer 2's main parameters on this rank, the value,
    gradient, learning rate and weight decay before the step and the value after it."""
    from megatron_raptr.layer import raptr_layers
    from megatron_raptr.optimizer_step import main_parameters

    joining = {param for layer in raptr_layers(trainer.model) if layer.layer_number == 2
               for param in layer.parameters()}
    records = []
    for leaf in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = leaf.optimizer
        mains = [main for param, main in main_parameters(leaf).items() if param in joining]
        step = leaf.step_with_ready_grads  # RaPTr's optimizer step, with the inner step in it

        def probed(*args, inner=inner, mains=mains, step=step, **kwargs):
            group_of = {param: group for group in inner.param_groups for param in group["params"]}
            before = [(main, main.detach().clone(), main.grad.clone(), group_of[main]["lr"],
                       group_of[main]["weight_decay"]) for main in mains]
            result = step(*args, **kwargs)
            records.extend((value, grad, lr, wd, main.detach().clone()) for main, value, grad, lr, wd in before)
            return result

        leaf.step_with_ready_grads = probed
    return records


def _join(argv, save_dir):
    """Trains to the join step (saving and resuming there when `save_dir` is given) and returns the
    probe's records of that step."""
    from megatron.core import parallel_state

    from megatron_raptr.training import checkpointing, data
    from megatron_raptr.training.arguments import parse_args
    from megatron_raptr.training.initialize import initialize_distributed
    from megatron_raptr.training.loop import TrainState, build_trainer

    def start(state):
        args = parse_args(argv, world_size=2)
        initialize_distributed(1, 1, args.seed)
        trainer, tokenizer = build_trainer(args)
        if state is not None:
            saved = checkpointing.load_checkpoint(save_dir, trainer.model, trainer.optimizer, trainer.scheduler)
            state = TrainState(**{key: saved[key] for key in ("iteration", "consumed_samples", "cumulative_flops")})
        state = state or TrainState()
        train, _ = trainer.family.build_datasets(args, tokenizer)
        iterator = data.build_data_iterator(train, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                                            parallel_state.get_data_parallel_world_size(),
                                            consumed_samples=state.consumed_samples)
        return trainer, state, iterator

    trainer, state, iterator = start(None)
    for _ in range(JOIN):
        trainer.train_step(state, iterator)
    if save_dir:
        trainer.args.save = save_dir
        trainer.save(state)
        parallel_state.destroy_model_parallel()
        trainer, state, iterator = start(state)
    assert trainer.runtime.sampler.path(state.iteration).active == (1, 2, 3, 4)
    records = _probe_join_step(trainer)
    trainer.train_step(state, iterator)
    parallel_state.destroy_model_parallel()
    return records


def _job(tmp):
    results = {}
    for optimizer, extra in OPTIMIZERS.items():
        for mode, flags in MODES.items():
            argv = MODEL + FLAGS + extra + flags
            for resumed in (False, True):
                save_dir = str(tmp / f"{optimizer}-{mode}") if resumed else None
                results[optimizer, mode, resumed] = _join(argv, save_dir)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_distributed(_job, 2, tmp_path_factory.mktemp("adam_steps"))


def _fresh_adamw_step(value, grad, lr, weight_decay):
    """Independent: torch's AdamW from nothing, one step on this gradient (MODEL's betas and eps)."""
    import torch

    param = value.clone().requires_grad_()
    param.grad = grad.clone()
    torch.optim.AdamW([param], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay).step()
    return param.detach()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_layer_joining_late_takes_a_fresh_adam_step(ranks, optimizer, mode):
    import torch

    for resumed in (False, True):
        records = [record for rank in ranks for record in rank[optimizer, mode, resumed]]
        assert records, "no rank holds layer 2's parameters"
        moved = 0.0
        for value, grad, lr, weight_decay, after in records:
            if mode == "catch-up":  # the JOIN steps of weight decay it missed, applied first (constant LR)
                value = value * (1 - lr * weight_decay) ** JOIN
            torch.testing.assert_close(after, _fresh_adamw_step(value, grad, lr, weight_decay), rtol=1e-5, atol=1e-9)
            moved = max(moved, float((after - value * (1 - lr * weight_decay)).abs().max()) / lr)
        # A fresh Adam step moves an element with |g| >> eps by LR; one count shared by all
        # parameters (1 - beta^13 for beta2 0.999) moved it 0.48 x LR.
        assert 0.99 < moved <= 1.0 + 1e-6, moved
    for rank in ranks:
        for uninterrupted, resumed in zip(rank[optimizer, mode, False], rank[optimizer, mode, True]):
            assert torch.equal(uninterrupted[4], resumed[4])


class GroupCountAdamW(__import__("torch").optim.Optimizer):
    """Apex's and Transformer Engine's FusedAdam contract, which needs CUDA: AdamW with one step count
    per parameter group (group['step']), skipping parameters without a gradient."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step(self):
        import torch

        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** group["step"])
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** group["step"])
                param.data.mul_(1 - group["lr"] * group["weight_decay"])
                param.data.addcdiv_(m_hat, v_hat.sqrt() + group["eps"], value=-group["lr"])


@pytest.mark.parametrize("per_group", [False, True], ids=["torch-adamw", "fused-adam-contract"])
def test_each_parameter_steps_with_its_own_count_then_shares_one_again(per_group):
    """Three parameters at shared count 10 that missed 0, 7 and 10 steps take the step a per-parameter
    AdamW with counts 10, 3 and 0 takes (the last one: fresh), and are all at count 11 afterwards."""
    import torch

    from megatron_raptr.optimizer_step import _own_counts

    torch.manual_seed(0)
    values = [torch.randn(5) for _ in range(3)]
    moments = [(torch.randn(5).abs() * 0.1, torch.rand(5) * 0.01) for _ in range(3)]
    moments[2] = (torch.zeros(5), torch.zeros(5))  # never updated
    grads = [torch.randn(5) for _ in range(3)]
    missed = [0, 7, 10]

    def build(optimizer_class, counts):
        params = [torch.nn.Parameter(value.clone()) for value in values]
        optimizer = optimizer_class(params, lr=1e-2, weight_decay=0.1)
        for param, (m, v), grad, count in zip(params, moments, grads, counts):
            optimizer.state[param].update(exp_avg=m.clone(), exp_avg_sq=v.clone())
            if optimizer_class is torch.optim.AdamW:
                optimizer.state[param]["step"] = torch.tensor(float(count))
            param.grad = grad.clone()
        if optimizer_class is not torch.optim.AdamW:
            optimizer.param_groups[0]["step"] = counts[0]
        return params, optimizer

    reference = []
    for index, count in enumerate(10 - m for m in missed):
        params, optimizer = build(torch.optim.AdamW, [count] * 3)
        optimizer.step()
        reference.append(params[index].detach())
    params, optimizer = build(GroupCountAdamW if per_group else torch.optim.AdamW, [10] * 3)
    groups = optimizer.param_groups
    with _own_counts(optimizer, {param: m for param, m in zip(params, missed) if m}):
        optimizer.step()
    for param, expected in zip(params, reference):
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)
    assert optimizer.param_groups is groups
    counts = [groups[0]["step"]] if per_group else [float(optimizer.state[p]["step"]) for p in params]
    assert counts == [11] * len(counts)


def _missed_through(sampler, skipped_take_no_step, steps, replay_from=None):
    from megatron_raptr.adam_steps import MissedSteps

    missed = MissedSteps(sampler.schedule.num_layers, skipped_take_no_step, sampler)
    for t in range(replay_from or 0, steps):
        counts = dict(missed.through(sampler.path(t)))
    return counts


def test_missed_steps_follow_the_path_history_and_stacking_growth():
    from megatron_raptr.sampler import PathSampler
    from megatron_raptr.schedule import RaptrSchedule
    from megatron_raptr.stacking import StackingSampler, StackingSchedule

    sampler = PathSampler(RaptrSchedule.parse("2@0,3@4", num_layers=4, train_iters=10, fixed_layers=(1, 4),
                                               sampling="fixed-size"), seed=3)
    paths = [sampler.path(t).active for t in range(10)]
    frozen = _missed_through(sampler, True, 10)
    assert frozen == {layer: sum(layer not in path for path in paths) for layer in range(1, 5)}
    first = {layer: next(t for t, path in enumerate(paths) if layer in path) for layer in range(1, 5)}
    assert _missed_through(sampler, False, 10) == first  # until first on the path, then every step counts
    assert _missed_through(sampler, True, 10, replay_from=7) == frozen  # a resumed run replays the history

    def stacking(optimizer_state, copy="top"):
        schedule = StackingSchedule.parse("2@0,3@4,4@6", 4, 10, copy=copy, optimizer_state=optimizer_state)
        return _missed_through(StackingSampler(schedule), False, 10)

    # Layer 3 is born at step 4 copying layer 2, layer 4 at step 6 copying layer 3.
    assert stacking("fresh") == {1: 0, 2: 0, 3: 4, 4: 6}
    assert stacking("copy") == {1: 0, 2: 0, 3: 0, 4: 0}
    # MIDAS: 2 -> 3 copies layer 1 into a new layer 2 and moves layer 2 up to 3 (with its own moments);
    # 3 -> 4 copies layer 2 into a new layer 3 and moves layer 3 up to 4.
    assert stacking("fresh", copy="middle") == {1: 0, 2: 4, 3: 6, 4: 0}

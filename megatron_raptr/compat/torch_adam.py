"""Loading Megatron's DistributedOptimizer state when its Adam is torch's (no TE or Apex).

Not a CPU matter: a GPU machine without Transformer Engine and Apex hits it too.
DistributedOptimizer.load_state_dict gives every parameter's state one shared 'step'
tensor, which torch's Adam then increments once per parameter (the resumed run drifts
from the second step on), and _set_main_param_and_optimizer_states copies every state
key from the loaded tensors, whose 'step' is never the saved one (it comes from
param_groups): the 'fully_reshardable' format has none, the per-rank 'dp_reshardable' one
the value before loading (a non-persistent entry). Here each parameter keeps its own copy
of the step that param_groups restored.
"""

from megatron_raptr import megatron_internals as internals


def needed() -> bool:
    """Whether Megatron-Core fell back to torch's Adam."""
    return internals.adam.get().__module__.startswith("torch.")


def install() -> None:
    """Idempotent."""
    set_states = internals.set_main_param_and_optimizer_states.get()
    if getattr(set_states, "_owns_step", False):
        return

    def set_states_with_own_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in state:
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        set_states(self, model_param, tensors)

    set_states_with_own_step._owns_step = True
    internals.set_main_param_and_optimizer_states.replace(set_states_with_own_step)

"""On a GPU: skipped layers launch no kernels. Skipped without CUDA (tools/gpu_check.sh runs it)."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer import TransformerConfig
from torch.profiler import ProfilerActivity, profile

from megatron_raptr import PathSetter, get_gpt_raptr_layer_spec
from megatron_raptr.sampler import Path
from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB, SEQ, BATCH = 1024, 256, 2


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    initialize_distributed(1, 1, seed=7)
    yield
    destroy_distributed()


def gpt(num_layers, spec):
    config = TransformerConfig(num_layers=num_layers, hidden_size=256, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16)
    # Torch norms take no params_dtype: cast the whole model, as Megatron's Float16Module does.
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ).to("cuda", torch.bfloat16)


def kernels_of_a_training_step(model):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    model(tokens, positions, None, labels=tokens).float().mean().backward()  # warm-up: lazy inits
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(tokens, positions, None, labels=tokens).float().mean().backward()
        torch.cuda.synchronize()
    return sorted(event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def test_skipped_layers_launch_no_kernels():
    """A path of 3 of 8 layers launches exactly the kernels of a dense 3-layer model
    (Transformer Engine's layers when installed, Megatron's local ones otherwise)."""
    dense_spec = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec() if gpt_layer_specs.HAVE_TE
                  else gpt_layer_specs.get_gpt_layer_local_spec())
    raptr = gpt(8, get_gpt_raptr_layer_spec())
    PathSetter(raptr)(Path(0, 0, (1, 4, 8), {1: 1.0, 4: 1.0, 8: 1.0}))
    raptr_kernels = kernels_of_a_training_step(raptr)
    dense_kernels = kernels_of_a_training_step(gpt(3, dense_spec))
    assert len(raptr_kernels) == len(dense_kernels)
    assert raptr_kernels == dense_kernels


def test_batches_come_pinned_and_reach_the_gpu_without_a_blocking_copy():
    """The loader pins batches (workers collate them), so stage_batch's non_blocking copies are asynchronous."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    from megatron_raptr.training import data
    from megatron_raptr.training.tokenizer import build_tokenizer

    initialize_distributed(1, 1)
    try:
        args = data.add_data_args(__import__("argparse").ArgumentParser()).parse_args(
            ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
        config = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=None, blend_per_split=None, split=None,
                                  path_to_cache=None, tokenizer=build_tokenizer(args), reset_position_ids=False,
                                  reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        dataset = MockGPTDataset(None, "train", 64, None, "train", config)
        iterator = data.build_data_iterator(dataset, 4, 0, 1, 0, num_workers=2)
        batch = next(iterator)
        assert all(value.is_pinned() for value in batch.values())
        on_gpu = data.stage_batch(iter([batch]), ("tokens", "position_ids"), ("labels", "loss_mask"))
        assert all(value.is_cuda for value in on_gpu.values()) and len(on_gpu) == 4
    finally:
        destroy_distributed()

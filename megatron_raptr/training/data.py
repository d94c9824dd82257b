"""Training data: Megatron-LM data flags, early checks, megatron-core datasets, batches.

Flow: `add_data_args(parser)` -> `validate_data_args(args)` (before any work, on every rank; reads
the .idx files) -> `check_token_ids(args)` (after torch.distributed starts: one rank reads the .bin
files) -> `build_datasets(args, tokenizer)` (megatron-core BlendedMegatronDatasetBuilder + GPTDataset;
call it on every rank: with torch.distributed initialised rank 0 builds the index cache first and
the others wait at a barrier) -> `build_data_iterator(...)` per data-parallel rank -> `stage_batch(...)`
in the forward step.

The trainer's own arguments define --seq-length, --seed, --micro-batch-size, --global-batch-size,
--train-iters, --eval-iters and --eval-interval.
"""

import argparse
import contextlib
import os
import struct
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    get_bin_path,
    get_idx_path,
)

from megatron_raptr.training.initialize import current_device
from megatron_raptr.training.tokenizer import add_tokenizer_args, build_tokenizer

Blend = Tuple[List[str], Optional[List[float]]]

# .idx header: magic, version (u64), dtype code (u8), sequence count (u64), document count (u64).
_IDX_HEADER_STRUCT = struct.Struct("<QBQQ")
_IDX_HEADER_BYTES = len(_INDEX_HEADER) + _IDX_HEADER_STRUCT.size


def add_data_args(parser):
    """Add the data and tokenizer flags (Megatron-LM names) to `parser`; return it."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="Dataset prefixes (PREFIX.bin/.idx from tools/preprocess_data.py), optionally "
        "weighted: 'A B' or '0.7 A 0.3 B'. Train/valid/test are cut from it by --split.",
    )
    group.add_argument(
        "--split",
        default="969,30,1",
        help="Train,valid,test weights for cutting --data-path by document (Megatron-LM).",
    )
    group.add_argument(
        "--train-data-path",
        nargs="*",
        default=None,
        help="Training blend (same format as --data-path), instead of --data-path/--split.",
    )
    group.add_argument(
        "--valid-data-path",
        nargs="*",
        default=None,
        help="Validation blend, used with --train-data-path (e.g. a held-out file).",
    )
    group.add_argument(
        "--mock-data", action="store_true", help="Synthetic tokens instead of a dataset."
    )
    group.add_argument(
        "--data-cache-path",
        default=None,
        help="Directory for the dataset index cache (default: next to each dataset).",
    )
    group.add_argument(
        "--reset-position-ids", action="store_true", help="Restart position ids at each EOD."
    )
    group.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="Block attention across EOD (needs the dataloader attention mask).",
    )
    group.add_argument("--eod-mask-loss", action="store_true", help="No loss on EOD tokens.")
    group.add_argument(
        "--no-create-attention-mask-in-dataloader",
        action="store_false",
        dest="create_attention_mask_in_dataloader",
        help="No [1, s, s] mask in each sample. Without --reset-attention-mask there is none anyway: "
        "attention is causal and builds its own.",
    )
    group.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="Data loader worker processes per rank (0: load in the training process). "
        "Default: 2 with CUDA, as Megatron-LM; 0 without.",
    )
    add_tokenizer_args(parser)
    return parser


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(values: Optional[Sequence[str]], flag: str) -> Optional[Blend]:
    """'A B' -> (['A', 'B'], None); '0.7 A 0.3 B' -> (['A', 'B'], [0.7, 0.3]).

    Raises ValueError naming `flag` when weights and prefixes do not alternate.
    """
    if not values:
        return None
    if not _is_number(values[0]):
        if any(_is_number(value) for value in values):
            raise ValueError(
                f"{flag}: give either prefixes only or 'WEIGHT PREFIX' pairs starting with a "
                f"weight; got {list(values)}"
            )
        return list(values), None
    if len(values) % 2:
        raise ValueError(
            f"{flag}: blend weights and prefixes must alternate (W1 PREFIX1 W2 PREFIX2 ...); "
            f"got an odd number of items: {list(values)}"
        )
    weights, prefixes = list(values[0::2]), list(values[1::2])
    for weight, prefix in zip(weights, prefixes):
        if not _is_number(weight) or _is_number(prefix):
            raise ValueError(f"{flag}: expected 'WEIGHT PREFIX' pairs, got {weight!r} {prefix!r}")
    weights = [float(weight) for weight in weights]
    if any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise ValueError(f"{flag}: blend weights must be >= 0 with a positive sum: {weights}")
    return prefixes, weights


def _check_split(split: str) -> None:
    parts = split.split(",")
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise ValueError(
            f"--split: expected up to three comma-separated weights train,valid,test with a "
            f"positive train weight (e.g. 969,30,1); got {split!r}"
        )


def check_split_parts(split: str, prefix: str, usable: np.ndarray, what: str = "tokens") -> None:
    """Raise ValueError unless each used part of `usable` has a nonzero entry.

    `usable` has an entry per element megatron-core cuts a dataset by (GPT: sequences, BERT:
    documents); it loops forever building an epoch of a part with nothing to sample.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(("train", "valid"), matrix):
        if bounds is not None:
            begin, end = (int(round(bound * len(usable))) for bound in bounds)
            if not usable[begin:end].any():
                raise ValueError(
                    f"--split {split}: the {name} part of {prefix} (documents {begin} to {end} "
                    f"of {len(usable)}) holds no {what}; use more data or another --split"
                )


def check_indexed_dataset(prefix: str, flag: str) -> Tuple[np.ndarray, np.dtype]:
    """Raise ValueError naming `flag` and the file unless PREFIX.bin/.idx form a sound dataset.

    Checks the .idx header and that its sizes, sequence pointers and document boundaries agree
    with each other and with the .bin length, and that it holds tokens. Reads the .idx through
    memory maps; of the .bin only its size. Returns the sequence lengths (memory-mapped) and the
    token dtype.
    """
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            raise ValueError(f"{flag}: give the prefix without '{suffix}': {prefix[:-4]}")
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"{flag}: {path} not found (a dataset prefix needs both PREFIX.bin and "
                f"PREFIX.idx; tools/preprocess_data.py writes them)"
            )

    def corrupt(why: str) -> ValueError:
        return ValueError(f"{flag}: corrupt dataset index {idx_path}: {why}")

    with open(idx_path, "rb") as stream:
        head = stream.read(_IDX_HEADER_BYTES)
    if len(head) < _IDX_HEADER_BYTES or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise corrupt("not a Megatron indexed-dataset .idx file (bad header)")
    version, code, num_sequences, num_documents = _IDX_HEADER_STRUCT.unpack(
        head[len(_INDEX_HEADER) :]
    )
    if version != 1:
        raise corrupt(f"unsupported version {version}")
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except ValueError:
        raise corrupt(f"unknown token dtype code {code}") from None
    expected = _IDX_HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    idx_size = os.path.getsize(idx_path)
    if idx_size != expected:
        raise corrupt(
            f"{idx_size} bytes, but its header ({num_sequences} sequences, {num_documents - 1} "
            f"documents) needs {expected} (truncated or overwritten?)"
        )
    if num_sequences == 0 or num_documents == 0:
        raise corrupt("it holds no sequences")
    offset = _IDX_HEADER_BYTES
    lengths = np.memmap(idx_path, np.int32, "r", offset=offset, shape=(num_sequences,))
    offset += lengths.nbytes
    pointers = np.memmap(idx_path, np.int64, "r", offset=offset, shape=(num_sequences,))
    offset += pointers.nbytes
    documents = np.memmap(idx_path, np.int64, "r", offset=offset, shape=(num_documents,))
    if (lengths < 0).any():
        raise corrupt("negative sequence lengths")
    ends = np.cumsum(lengths, dtype=np.int64) * dtype.itemsize
    if pointers[0] != 0 or not np.array_equal(pointers[1:], ends[:-1]):
        raise corrupt("sequence pointers do not follow the sequence lengths")
    if documents[0] != 0 or documents[-1] != num_sequences or (np.diff(documents) < 0).any():
        raise corrupt("document boundaries are not increasing from 0 to the sequence count")
    bin_size = os.path.getsize(bin_path)
    if bin_size == 0:
        raise ValueError(f"{flag}: {bin_path} holds no tokens")
    if bin_size != ends[-1]:
        raise ValueError(
            f"{flag}: {bin_path} has {bin_size} bytes but {idx_path} describes {ends[-1]} "
            f"({ends[-1] // dtype.itemsize} tokens of {dtype.name}): the pair is truncated or "
            f"mismatched; rerun tools/preprocess_data.py"
        )
    return lengths, dtype


def _given_data_flags(args) -> List[Tuple[str, Sequence[str]]]:
    flags = {
        "--data-path": args.data_path,
        "--train-data-path": args.train_data_path,
        "--valid-data-path": args.valid_data_path,
    }
    return [(flag, values) for flag, values in flags.items() if values]


def validate_data_args(args) -> None:
    """Raise ValueError, naming the flag and the file, for data flags that cannot work.

    Loads the tokenizer (checking its flags and file) and reads every dataset's .idx; the token
    ids in the .bin files are check_token_ids's.
    """
    build_tokenizer(args)
    given = _given_data_flags(args)
    if args.mock_data:
        if given:
            raise ValueError(f"--mock-data cannot be combined with {given[0][0]}")
        return
    if not given:
        raise ValueError(
            "no training data: give --data-path PREFIX [...], or --train-data-path with "
            "--valid-data-path, or --mock-data"
        )
    if args.data_path and (args.train_data_path or args.valid_data_path):
        raise ValueError("--data-path cannot be combined with --train-data-path/--valid-data-path")
    if args.data_path:
        _check_split(args.split)
    elif not args.train_data_path:
        raise ValueError("--valid-data-path needs --train-data-path")

    for flag, values in given:
        for prefix in parse_blend(values, flag)[0]:
            lengths, _ = check_indexed_dataset(prefix, flag)
            if flag == "--data-path":
                check_split_parts(args.split, prefix, lengths)


def check_token_ids(args) -> None:
    """Raise ValueError, naming the flag and the file, where a .bin file holds a token id the
    tokenizer does not have (the data was made with another tokenizer). After validate_data_args.

    This reads every .bin file whole: one rank does, and with torch.distributed initialised (call
    it on every rank) it sends its verdict to the others, so a job reads the data once, not once
    per rank.
    """
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            _check_token_ids(args)
        except ValueError as found:
            error = str(found)
    if dist.is_initialized():
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise ValueError(error)


def _check_token_ids(args) -> None:
    vocab_size = build_tokenizer(args).vocab_size
    if args.tokenizer_type == "NullTokenizer":
        tokenizer_flag = f"NullTokenizer --vocab-size {args.vocab_size}"
    else:
        tokenizer_flag = f"--tokenizer-model {args.tokenizer_model}"
    for flag, values in [] if args.mock_data else _given_data_flags(args):
        for prefix in parse_blend(values, flag)[0]:
            _, dtype = check_indexed_dataset(prefix, flag)
            bin_path = get_bin_path(prefix)
            max_id = int(np.memmap(bin_path, dtype, "r").max())
            if max_id >= vocab_size:
                raise ValueError(
                    f"{flag}: {bin_path} holds token id {max_id}, but the tokenizer "
                    f"({tokenizer_flag}) has only {vocab_size} ids: the data was made with another "
                    f"tokenizer"
                )


def dataset_sizes(args) -> List[int]:
    """Samples per split: train_iters * global batch, and Megatron-LM's validation count."""
    train = args.train_iters * args.global_batch_size
    valid = (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    return [train, valid, 0]


def build_datasets(args, tokenizer):
    """Return (train_ds, valid_ds) of megatron-core GPTDataset/BlendedDataset (or MockGPTDataset).

    valid_ds is None when nothing is held out (--split with a zero valid weight, or
    --train-data-path without --valid-data-path). Each sample is a dict of tensors: tokens,
    labels, loss_mask, position_ids and, with --reset-attention-mask (unless
    --no-create-attention-mask-in-dataloader), attention_mask: otherwise the mask would be the
    causal one, which attention builds itself. Works without torch.distributed; with it, call on
    every rank.
    """
    config = GPTDatasetConfig(
        **blend_config(args, tokenizer),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.reset_attention_mask and args.create_attention_mask_in_dataloader,
    )
    return build_split_datasets(MockGPTDataset if config.mock else GPTDataset, config, args)


def blend_config(args, tokenizer) -> dict:
    """The dataset-config fields every model's datasets take from the data flags."""
    if args.data_path:
        blend, blend_per_split, split = parse_blend(args.data_path, "--data-path"), None, args.split
    elif args.train_data_path:
        blend, split = None, None
        blend_per_split = [
            parse_blend(args.train_data_path, "--train-data-path"),
            parse_blend(args.valid_data_path, "--valid-data-path"),
            None,
        ]
    else:  # --mock-data: megatron-core switches to mock data when no blend is given
        blend, blend_per_split, split = None, None, None
    return dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
    )


def build_with_validation_sets(args, tokenizer, build_datasets: Callable) -> Tuple[object, Dict[str, object]]:
    """--multiple-validation-sets: the train dataset and each --valid-data-path prefix as a validation
    set of its own, named by its file name (e.g. valid_wiki_text_document). `build_datasets` is the
    model family's (args, tokenizer) -> (train, valid); it is never given the prefixes as a blend."""
    train, sets = None, {}
    for prefix in args.valid_data_path:
        one_set = argparse.Namespace(**{**vars(args), "valid_data_path": [prefix]})
        train, sets[os.path.basename(prefix)] = build_datasets(one_set, tokenizer)
    return train, sets


def build_split_datasets(dataset_cls, config, args):
    """(train, valid) datasets of `dataset_cls`, sized for the run by megatron-core's builder."""
    # Nothing evaluates the test split: do not build it (megatron-core would also loop forever
    # on an empty one).
    if config.split_matrix is not None:
        config.split_matrix[2] = None
    with _process_group():
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
            dataset_cls, dataset_sizes(args), lambda: True, config
        ).build()
    return train_ds, valid_ds


@contextlib.contextmanager
def _process_group():
    """A private one-process group while building, when torch.distributed is not initialised.

    megatron-core's BlendedDataset calls torch.distributed.get_rank() when it writes its index
    cache, so a blend with --data-cache-path would fail in a single process (tools, tests).
    """
    if torch.distributed.is_initialized():
        yield
        return
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def build_data_iterator(
    dataset,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    consumed_samples: int,
    num_workers: int = 0,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Micro-batches of `dataset` for one data-parallel rank, in Megatron-LM's pretraining order.

    As MegatronPretrainingSampler: samples are taken in index order from `consumed_samples`
    (counted over all data-parallel ranks, as the trainer's consumed-samples counter); each group
    of micro_batch_size * data_parallel_size consecutive samples is split so that rank r gets
    [r * micro_batch_size, (r + 1) * micro_batch_size). Restarting at the consumed count of a
    checkpoint continues with exactly the batches an uninterrupted run would see. Stops at the
    end of the dataset, dropping a last incomplete group (the datasets are sized for the run).
    For evaluation, build a fresh iterator with consumed_samples=0 each time, so that every
    evaluation sees the same batches.

    Each micro-batch is a dict of the samples' tensors stacked along a new leading batch dim,
    made by `num_workers` loader processes (0: by this one), in pinned memory where there is CUDA,
    so that stage_batch's copies to the GPU do not wait.
    """
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
    if micro_batch_size <= 0 or consumed_samples < 0:
        raise ValueError(
            f"need micro_batch_size > 0 and consumed_samples >= 0, got {micro_batch_size}, "
            f"{consumed_samples}"
        )
    batches = _PretrainingBatches(
        len(dataset), micro_batch_size, data_parallel_rank, data_parallel_size, consumed_samples
    )
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )
    )


class _PretrainingBatches:
    """The sample indices of each micro-batch (a DataLoader batch sampler): build_data_iterator's order."""

    def __init__(self, num_samples, micro_batch_size, data_parallel_rank, data_parallel_size, start):
        self.num_samples, self.micro_batch_size, self.start = num_samples, micro_batch_size, start
        self.step = micro_batch_size * data_parallel_size
        self.first = data_parallel_rank * micro_batch_size

    def __iter__(self):
        for group in range(self.start, self.num_samples - self.step + 1, self.step):
            yield list(range(group + self.first, group + self.first + self.micro_batch_size))


def stage_batch(
    data_iterator: Iterator[Dict[str, torch.Tensor]],
    first_stage: Sequence[str],
    last_stage: Sequence[str],
    every_stage: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """The next micro-batch's tensors that this pipeline stage uses, on its device.

    As Megatron-LM's get_batch: the first stage takes the `first_stage` keys (the embedding's
    inputs), the last stage the `last_stage` keys (the loss's), every stage `every_stage` (masks
    attention needs) where the batch has them. The copies do not make the host wait for the GPU
    (non_blocking, from the loader's pinned memory).
    """
    batch = next(data_iterator)
    keys = list(every_stage)
    if parallel_state.is_pipeline_first_stage():
        keys += first_stage
    if parallel_state.is_pipeline_last_stage():
        keys += last_stage
    device = current_device()
    return {key: batch[key].to(device, non_blocking=True) for key in keys if key in batch}

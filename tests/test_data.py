"""Tokenizer training, preprocessing to .bin/.idx, datasets, batch order and data-flag errors."""

import argparse
import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset
from megatron_raptr.training.data import (
    add_data_args,
    build_data_iterator,
    build_datasets,
    check_token_ids,
    stage_batch,
    validate_data_args,
)
from megatron_raptr.training.tokenizer import (
    SENTENCEPIECE_MAX_LINE_BYTES,
    build_tokenizer,
    split_long_line,
)
from tests.documents import stdlib_documents

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32


def load_tool(name):
    """Import tools/NAME.py as module NAME (registered, so worker processes can unpickle it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_args(*argv, **trainer):
    """Data flags as the trainer parses them, plus the trainer's own settings."""
    args = add_data_args(argparse.ArgumentParser()).parse_args(list(argv))
    defaults = dict(seq_length=SEQ, seed=1234, micro_batch_size=2, global_batch_size=8,
                    train_iters=10, eval_iters=2, eval_interval=5)  # fmt: skip
    for key, value in {**defaults, **trainer}.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """JSON lines (with an empty document and a line over SentencePiece's limit), tokenizers,
    and the preprocessed dataset."""
    root = tmp_path_factory.mktemp("corpus")
    documents = stdlib_documents()
    long_line = "quetzalcoatl " * (2 * SENTENCEPIECE_MAX_LINE_BYTES // 13)
    texts = documents + ["", long_line]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))

    train_tokenizer = load_tool("train_tokenizer")
    model = train_tokenizer.main(
        ["--input", str(jsonl), "--output-prefix", str(root / "spm"), "--vocab-size", "1000"]
    )
    small_model = train_tokenizer.main(
        ["--input", str(jsonl), "--output-prefix", str(root / "small"), "--vocab-size", "400"]
    )
    load_tool("preprocess_data").main(
        ["--input", str(jsonl), "--output-prefix", str(root / "docs"), "--tokenizer-type",
         "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod", "--workers", "2"]
    )  # fmt: skip
    tokenizer = build_tokenizer(make_args("--tokenizer-type", "SentencePieceTokenizer",
                                          "--tokenizer-model", model))  # fmt: skip
    return dict(root=root, jsonl=jsonl, texts=texts, model=model, small_model=small_model,
                prefix=str(root / "docs_text_document"), tokenizer=tokenizer)  # fmt: skip


def real_args(corpus, *argv, **trainer):
    return make_args("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                     corpus["model"], "--data-cache-path", str(corpus["root"] / "cache"),
                     *argv, **trainer)  # fmt: skip


def test_sentencepiece_round_trip_and_long_lines(corpus):
    tokenizer = corpus["tokenizer"]
    assert tokenizer.vocab_size == 1000 and tokenizer.eod == 2
    text = "Return a new  dict.\n\n\tIndented: 12345 ✓"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    # The only occurrences of this word are on one line longer than SentencePiece's limit: it
    # was learnt as a piece, so the line was split and fed to the trainer, not skipped.
    assert len(tokenizer.tokenize("quetzalcoatl")) <= 2


def test_split_long_line_respects_byte_limit():
    line = ("ab " * 50 + "é" * 40 + " ") * 20
    pieces = list(split_long_line(line, 64))
    assert all(len(piece.encode("utf-8")) <= 64 for piece in pieces)
    assert "".join(pieces).replace(" ", "") == line.replace(" ", "")


def test_preprocessed_tokens_match_direct_tokenization(corpus):
    tokenizer = corpus["tokenizer"]
    expected = [tokenizer.tokenize(text) + [tokenizer.eod] for text in corpus["texts"] if text]
    dataset = IndexedDataset(corpus["prefix"])
    assert len(dataset) == len(expected)  # the empty document is skipped
    for i, ids in enumerate(expected):
        assert dataset[i].tolist() == ids
    assert dataset.index.dtype == np.uint16

    # GPTDataset over all of it (no valid split): one epoch of SEQ-token samples + 1 label.
    args = real_args(corpus, "--data-path", corpus["prefix"], "--split", "1,0,0")
    validate_data_args(args)
    train_ds, valid_ds = build_datasets(args, tokenizer)
    total = sum(map(len, expected))
    assert valid_ds is None
    assert len(train_ds) == (total - 1) // SEQ
    sample = train_ds[0]
    assert sample["tokens"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


@pytest.fixture(scope="module")
def datasets(corpus):
    args = real_args(corpus, "--data-path", corpus["prefix"], "--split", "90,10,0")
    validate_data_args(args)
    return build_datasets(args, corpus["tokenizer"])


def batches(dataset, mbs, rank, dp, consumed, count, num_workers=0):
    iterator = build_data_iterator(dataset, mbs, rank, dp, consumed, num_workers)
    return [next(iterator) for _ in range(count)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_iterator_resumes_exactly(datasets):
    train_ds, _ = datasets
    for dp in (1, 2):
        for rank in range(dp):
            uninterrupted = batches(train_ds, 2, rank, dp, 0, 6)
            resumed = batches(train_ds, 2, rank, dp, 3 * 2 * dp, 3, num_workers=2)  # worker processes: the same
            for a, b in zip(uninterrupted[3:], resumed):
                assert_same(a, b)
    expected = [train_ds[i] for i in (10, 11)]  # the second rank's samples of the third step under DP=2
    for key, value in batches(train_ds, 2, 1, 2, 2 * 4, 1, num_workers=2)[0].items():
        assert torch.equal(value, torch.stack([torch.as_tensor(sample[key]) for sample in expected])), key


def test_data_parallel_slices_partition_the_batch(datasets):
    train_ds, valid_ds = datasets
    for dataset in (train_ds, valid_ds):
        whole = batches(dataset, 4, 0, 1, 0, 3)
        halves = [batches(dataset, 2, rank, 2, 0, 3) for rank in range(2)]
        for step, batch in enumerate(whole):
            assert batch["tokens"].shape == (4, SEQ)
            for key in batch:
                joined = torch.cat([halves[0][step][key], halves[1][step][key]])
                assert torch.equal(batch[key], joined), key


def test_iterator_stops_at_the_end(datasets):
    _, valid_ds = datasets
    steps = len(list(build_data_iterator(valid_ds, 2, 1, 2, 0)))
    assert steps == len(valid_ds) // 4
    assert list(build_data_iterator(valid_ds, 2, 0, 2, 4 * steps)) == []


def test_mock_data_with_null_tokenizer():
    args = make_args("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100")
    validate_data_args(args)
    tokenizer = build_tokenizer(args)
    # Megatron-Core 0.16 adds an end-of-document id after the N ids, later releases use id N - 1.
    assert tokenizer.vocab_size in (100, 101) and tokenizer.eod == tokenizer.vocab_size - 1
    train_ds, valid_ds = build_datasets(args, tokenizer)
    batch = next(build_data_iterator(train_ds, 2, 0, 1, 0))
    assert batch["tokens"].shape == (2, SEQ) and int(batch["tokens"].max()) < tokenizer.vocab_size
    assert len(train_ds) >= 10 * 8 and valid_ds is not None


@pytest.fixture
def copy_of_dataset(corpus, tmp_path):
    """A private copy of the dataset's .bin/.idx, free to damage."""
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus["prefix"] + suffix, tmp_path / f"copy{suffix}")
    return str(tmp_path / "copy")


def error_for(args):
    with pytest.raises(ValueError) as info:
        validate_data_args(args)
    return str(info.value)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_file(corpus, copy_of_dataset, suffix):
    os.remove(copy_of_dataset + suffix)
    message = error_for(real_args(corpus, "--data-path", copy_of_dataset))
    assert "--data-path" in message and copy_of_dataset + suffix in message


def corrupt_magic(prefix):
    with open(prefix + ".idx", "r+b") as stream:
        stream.write(b"NOTANIDX!")


def truncate(path, nbytes):
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) - nbytes)


# The .idx layout: magic, then version (u64), dtype code (u8), sequence count (u64) and
# document count (u64); then int32 sequence lengths, int64 sequence pointers (byte offsets
# into the .bin) and int64 document boundaries (sequence indices).
HEADER = len(_INDEX_HEADER)
TABLES = HEADER + 8 + 1 + 8 + 8


def sequence_count(prefix):
    with open(prefix + ".idx", "rb") as stream:
        stream.seek(HEADER + 9)
        return struct.unpack("<Q", stream.read(8))[0]


def overwrite(prefix, offset, fmt, value):
    """Overwrite one field of PREFIX.idx; a negative offset counts from the end."""
    with open(prefix + ".idx", "r+b") as stream:
        stream.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        stream.write(struct.pack(fmt, value))


def second_pointer(prefix):
    return TABLES + 4 * sequence_count(prefix) + 8


def empty_index(prefix):
    """A well-formed index of no sequences (its one document boundary is 0)."""
    with open(prefix + ".idx", "wb") as stream:
        stream.write(_INDEX_HEADER + struct.pack("<QBQQ", 1, 8, 0, 1) + struct.pack("<q", 0))


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (corrupt_magic, ".idx", "bad header"),
        (lambda prefix: overwrite(prefix, HEADER, "<Q", 2), ".idx", "unsupported version 2"),
        (lambda prefix: overwrite(prefix, HEADER + 8, "<B", 99), ".idx", "unknown token dtype code 99"),
        (lambda prefix: truncate(prefix + ".idx", 8), ".idx", "truncated"),
        (empty_index, ".idx", "holds no sequences"),
        (lambda prefix: overwrite(prefix, TABLES, "<i", -1), ".idx", "negative sequence lengths"),
        (lambda prefix: overwrite(prefix, second_pointer(prefix), "<q", 1), ".idx",
         "sequence pointers do not follow the sequence lengths"),
        # The last document boundary must be the sequence count.
        (lambda prefix: overwrite(prefix, -8, "<q", sequence_count(prefix) + 1), ".idx",
         "document boundaries are not increasing"),
        (lambda prefix: truncate(prefix + ".bin", os.path.getsize(prefix + ".bin")), ".bin", "holds no tokens"),
        (lambda prefix: truncate(prefix + ".bin", 2), ".bin", "truncated or mismatched"),
    ],
    ids=["magic", "version", "dtype", "idx-size", "no-sequences", "negative-length", "pointers", "documents",
         "empty-bin", "bin-size"],
)
def test_corrupt_dataset(corpus, copy_of_dataset, damage, file, words):
    damage(copy_of_dataset)
    message = error_for(real_args(corpus, "--train-data-path", copy_of_dataset))
    assert "--train-data-path" in message and copy_of_dataset + file in message
    assert words in message


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_prefix_given_with_a_suffix(corpus, suffix):
    message = error_for(real_args(corpus, "--data-path", corpus["prefix"] + suffix))
    assert f"--data-path: give the prefix without '{suffix}': {corpus['prefix']}" in message


def test_tokenizer_smaller_than_data_vocabulary(corpus):
    args = real_args(corpus, "--data-path", corpus["prefix"])
    check_token_ids(args)  # the data's own tokenizer
    args.tokenizer_model = corpus["small_model"]
    validate_data_args(args)  # reads only the .idx files
    with pytest.raises(ValueError) as info:
        check_token_ids(args)
    message = str(info.value)
    assert "--tokenizer-model" in message and corpus["small_model"] in message
    assert corpus["prefix"] + ".bin" in message and "400 ids" in message


def _check_token_ids_on_each_rank(args):
    """(this rank's reads of .bin files, its error message) under torch.distributed."""
    from megatron_raptr.training import data
    from megatron_raptr.training.initialize import destroy_distributed, initialize_distributed

    initialize_distributed()
    scans, scan = [], data._check_token_ids
    data._check_token_ids = lambda args: scan(scans.append(args) or args)
    try:
        data.check_token_ids(args)
        return len(scans), None
    except ValueError as error:
        return len(scans), str(error)
    finally:
        destroy_distributed()


def test_one_rank_reads_the_token_ids_and_tells_the_others(corpus):
    from tests.distributed import run_distributed

    args = real_args(corpus, "--data-path", corpus["prefix"], "--tokenizer-model", corpus["small_model"])
    (scans0, error0), (scans1, error1) = run_distributed(_check_token_ids_on_each_rank, 2, args)
    assert (scans0, scans1) == (1, 0)
    assert error0 == error1 and "400 ids" in error0


@pytest.mark.parametrize(
    "argv, words",
    [
        ((), "no training data"),
        (("--data-path", "0.5", "A", "0.5"), "odd number"),
        (("--data-path", "A", "0.5", "B"), "prefixes only or 'WEIGHT PREFIX' pairs"),
        (("--data-path", "0.5", "A", "B", "0.5"), "expected 'WEIGHT PREFIX' pairs, got 'B' '0.5'"),
        (("--data-path", "-1", "A", "2", "B"), "weights must be >= 0 with a positive sum"),
        (("--data-path", "A", "--train-data-path", "B"), "--data-path cannot be combined"),
        (("--mock-data", "--data-path", "A"), "--mock-data cannot be combined with --data-path"),
        (("--data-path", "A", "--valid-data-path", "B"), "cannot be combined"),
        (("--valid-data-path", "A"), "--valid-data-path needs --train-data-path"),
        (("--data-path", "A", "--split", "x"), "--split"),
        (("--mock-data", "--tokenizer-model", "/no/such.model"), "--tokenizer-model"),
    ],
)
def test_flag_errors(corpus, argv, words):
    assert words in error_for(real_args(corpus, *argv))


def test_tokenizer_flag_errors(tmp_path):
    assert "--tokenizer-type" in error_for(make_args("--mock-data"))
    null = make_args("--mock-data", "--tokenizer-type", "NullTokenizer")
    assert "--vocab-size" in error_for(null)
    (tmp_path / "bad.model").write_text("not a model")
    bad = make_args("--mock-data", "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", str(tmp_path / "bad.model"))  # fmt: skip
    with pytest.raises(ValueError, match="--tokenizer-model: .*bad.model is not a SentencePiece"):
        build_tokenizer(bad)


def test_empty_validation_part(corpus):
    message = error_for(real_args(corpus, "--data-path", corpus["prefix"], "--split", "9999,1,0"))
    assert "--split" in message and "valid part" in message and corpus["prefix"] in message


def test_preprocess_failure_leaves_no_output(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{bad}:2"):
        load_tool("preprocess_data").main(
            ["--input", str(bad), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", corpus["model"]]
        )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_no_attention_mask_unless_documents_reset_it(corpus):
    """Attention is causal and makes its own mask: the data has one only for --reset-attention-mask."""
    for argv, mask in (((), False), (("--no-create-attention-mask-in-dataloader",), False),
                       (("--reset-attention-mask",), True)):
        args = real_args(corpus, "--data-path", corpus["prefix"], "--split", "90,10,0", *argv)
        train_ds, _ = build_datasets(args, corpus["tokenizer"])
        assert ("attention_mask" in train_ds[0]) == mask, argv


@pytest.mark.parametrize("first, last, keys", [
    (True, True, {"tokens", "position_ids", "labels", "loss_mask"}),
    (True, False, {"tokens", "position_ids"}),
    (False, True, {"labels", "loss_mask"}),
    (False, False, set()),
])
def test_each_pipeline_stage_gets_the_keys_it_uses(monkeypatch, first, last, keys):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "is_pipeline_first_stage", lambda *args, **kwargs: first)
    monkeypatch.setattr(parallel_state, "is_pipeline_last_stage", lambda *args, **kwargs: last)
    batch = {key: torch.zeros(2, SEQ) for key in ("tokens", "position_ids", "labels", "loss_mask")}
    gpt_keys = dict(first_stage=("tokens", "position_ids"), last_stage=("labels", "loss_mask"),
                    every_stage=("attention_mask",))
    assert set(stage_batch(iter([batch]), **gpt_keys)) == keys
    masked = dict(batch, attention_mask=torch.zeros(2, 1, SEQ, SEQ, dtype=torch.bool))
    assert set(stage_batch(iter([masked]), **gpt_keys)) == keys | {"attention_mask"}

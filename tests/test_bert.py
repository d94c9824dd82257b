"""BERT masked-LM pretraining (--model bert), checked against plain Megatron-Core BertModels from the
same weights and batches (one process): a path is a dense BERT of its layers, the trainer trains what
it reports, the FLOPs accounting counts what the encoder computes, and the masked-LM batches follow
the masking flags."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer import TransformerConfig
from torch.utils.flop_counter import FlopCounterMode

from megatron_raptr import megatron_internals
from megatron_raptr import PathSetter, get_bert_raptr_layer_spec
from megatron_raptr.flops import bert_head_forward_flops_per_token, step_flops
from megatron_raptr.sampler import Path
from megatron_raptr.training import bert, data
from megatron_raptr.training.arguments import parse_args
from megatron_raptr.training.loop import TrainState
from tests.dense_reference import active_layers_state_dict
from tests.documents import stdlib_documents
from tests.distributed import run_distributed
from tests.test_data import ROOT, load_tool
from tests.test_pretrain import _pretrain_each, losses, train_records
from tests.test_trainer import build as trainer_run, single_process_megatron  # noqa: F401  (autouse fixture)

BASE = ("--model bert --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--lr 1e-3 --hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer "
        "--vocab-size 500 --eval-iters 1 --seed 5").split()
MODEL = BASE + "--global-batch-size 4 --train-iters 3 --lr-decay-style constant".split()


def build(*argv):
    return trainer_run(*argv, base=MODEL)


def microbatches(args, dataset, count):
    iterator = data.build_data_iterator(dataset, args.micro_batch_size, 0, 1, consumed_samples=0)
    return [next(iterator) for _ in range(count)]


def plain_bert(config, vocab_size, seq_length, num_layers, spec=bert_layer_local_spec):
    torch.manual_seed(0)
    return BertModel(dataclasses.replace(config, num_layers=num_layers), num_tokentypes=2,
                     transformer_layer_spec=spec, vocab_size=vocab_size, max_sequence_length=seq_length,
                     share_embeddings_and_output_weights=True, add_binary_head=True)


def model_losses(model, batch):
    """Megatron-LM's BERT losses, written out: the masked mean of the per-token loss, and the
    sentence-order cross entropy."""
    per_token, order_logits = model(batch["text"], batch["padding_mask"], tokentype_ids=batch["types"],
                                    lm_labels=batch["labels"])
    mask = batch["loss_mask"].float()
    return (per_token.float() * mask).sum() / mask.sum(), torch.nn.functional.cross_entropy(order_logits.float(),
                                                                                          batch["is_random"])


def mean_losses(model, batches):
    return [torch.stack(losses).mean().item() for losses in zip(*(model_losses(model, b) for b in batches))]


def weights(trainer):
    return {name: value.clone() if torch.is_tensor(value) else value
            for name, value in trainer.model[0].module.state_dict().items()}


def test_training_step_is_a_dense_bert_of_the_reported_layers_and_validation_the_full_model():
    """The step's masked-LM and sentence-order losses are those of a dense Megatron BertModel made of the
    reported layers; the other layers stay exactly as they were; validation runs all layers."""
    args, trainer, train, valid = build("--raptr-schedule", "2@0", "--raptr-sampling", "fixed-size",
                                        "--raptr-fixed-layers", "--raptr-scaling", "none", "--weight-decay", "0")
    before = weights(trainer)
    record = trainer.train_step(TrainState(), data.build_data_iterator(train, args.micro_batch_size, 0, 1, 0))
    active = record["active_layers"]
    assert len(active) == 2
    dense = plain_bert(trainer.config, args.padded_vocab_size, args.seq_length, len(active))
    dense.load_state_dict(active_layers_state_dict(before, active, stack="encoder"))
    lm_loss, sop_loss = mean_losses(dense, microbatches(args, train, args.num_microbatches))
    assert record["lm_loss"] == pytest.approx(lm_loss, rel=1e-6)
    assert record["sop_loss"] == pytest.approx(sop_loss, rel=1e-6)
    after = weights(trainer)
    # The sentence-order loss trains its head (no weight decay here: only a gradient moves it).
    assert not torch.equal(before["binary_head.weight"], after["binary_head.weight"])
    for layer in range(1, 5):
        prefix = f"encoder.layers.{layer - 1}."
        changed = [not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix) and "weight" in n]
        assert all(changed) if layer in active else not any(changed), (layer, active)

    full = plain_bert(trainer.config, args.padded_vocab_size, args.seq_length, 4).eval()
    full.load_state_dict(after)
    with torch.no_grad():
        expected, _ = mean_losses(full, microbatches(args, valid, args.eval_iters * args.num_microbatches))
    assert trainer.evaluate(valid) == pytest.approx(expected, rel=1e-6)


def test_a_path_costs_and_computes_a_dense_bert_of_its_layers():
    """Loss and every gradient of a dense BertModel of the path's layers; skipped layers get no gradient;
    FLOPs (torch.utils.flop_counter) equal the dense model's and the FLOPs accounting's."""
    vocab, seq, batch_size, active = 256, 32, 2, (1, 3, 6)
    config = TransformerConfig(num_layers=6, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0, use_cpu_initialization=True)
    raptr = plain_bert(config, vocab, seq, 6, get_bert_raptr_layer_spec())
    dense = plain_bert(config, vocab, seq, len(active))
    dense.load_state_dict(active_layers_state_dict(raptr.state_dict(), active, stack="encoder"))
    PathSetter(raptr)(Path(0, 0, active, {layer: 1.0 for layer in active}))
    generator = torch.Generator().manual_seed(1)
    padding = (torch.arange(seq) < torch.tensor([[seq], [seq - 9]])).long()  # the second sample is padded
    batch = dict(text=torch.randint(0, vocab, (batch_size, seq), generator=generator) * padding,
                 labels=torch.randint(0, vocab, (batch_size, seq), generator=generator), padding_mask=padding,
                 loss_mask=(torch.rand(batch_size, seq, generator=generator) < 0.3).long() * padding,
                 types=(torch.arange(seq) >= seq // 2).long().expand(batch_size, seq) * padding,
                 is_random=torch.tensor([0, 1]))

    def step(model):
        with FlopCounterMode(display=False) as counter:
            losses = model_losses(model, batch)
            sum(losses).backward()
        return counter.get_total_flops(), torch.stack(losses).detach()

    raptr_flops, raptr_losses = step(raptr)
    dense_flops, dense_losses = step(dense)
    torch.testing.assert_close(raptr_losses, dense_losses, rtol=1e-6, atol=0)
    raptr_grads = active_layers_state_dict({n: p.grad for n, p in raptr.named_parameters()}, active, "encoder")
    for name, p in dense.named_parameters():
        torch.testing.assert_close(raptr_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for layer in raptr.encoder.layers:
        assert all((p.grad is None) == (layer.layer_number not in active) for p in layer.parameters())
    assert raptr_flops == dense_flops
    head = bert_head_forward_flops_per_token(config, seq, binary_head=True)
    assert raptr_flops == step_flops(config, vocab, seq, batch_size * seq, len(active), head_flops_per_token=head)


def test_command_line_trains_bert_paths_and_evaluates_the_full_model(tmp_path):
    """The issue's command: 4 layers, paths of 2 then all 4 layers, falling masked-LM loss, full-model
    validation records."""
    metrics = tmp_path / "m.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_raptr.py"), "--model", "bert", "--mock-data", "--tokenizer-type",
         "NullTokenizer", "--vocab-size", "500", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads",
         "4", "--seq-length", "64", "--micro-batch-size", "4", "--lr", "1e-3", "--raptr-schedule", "2@0,4@10",
         "--train-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--metrics-file", str(metrics)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if "lm_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["active_layers"] for r in train] == [[1, 4]] * 10 + [[1, 2, 3, 4]] * 10
    losses = [r["lm_loss"] for r in train]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert [r["iteration"] for r in evals] == [10, 20] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert train[0]["step_flops"] < train[-1]["step_flops"]


@pytest.mark.parametrize("extra, world_size, message", [
    (["--mask-prob", "0.2"], 1, "--mask-prob needs --model bert"),
    (["--bert-no-binary-head"], 1, "--bert-no-binary-head needs --model bert"),
    (["--model", "bert", "--mask-prob", "1"], 1, "--mask-prob must be between 0 and 1"),
    (["--model", "bert", "--short-seq-prob", "-0.1"], 1, "--short-seq-prob must be between 0 and 1"),
    (["--model", "bert", "--eod-mask-loss"], 1, "--eod-mask-loss is a GPT data flag"),
    (["--model", "bert", "--seq-length", "4"], 1, "--seq-length 4 is too short for BERT"),
    (["--model", "bert", "--seed", "0"], 1, "--seed must be positive with --model bert"),
    (["--model", "bert", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
     "--sequence-parallel with --model bert needs Apex"),
])
def test_bad_bert_arguments_name_the_flag(extra, world_size, message, capsys):
    if "--sequence-parallel" in extra and megatron_internals.bert_lm_head_norm_impl.get() is not bert.WrappedTorchNorm:
        pytest.skip("Apex is installed: Megatron's BERT head supports sequence parallelism")
    base = [arg for arg in MODEL if arg not in ("--model", "bert")]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base + extra, world_size=world_size)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def sample_statistics(dataset, tokenizer, count):
    """Masked-LM statistics over `count` samples, with checks of each sample's padding."""
    real = candidates = masked = as_mask = unchanged = short = 0
    target = dataset.config.sequence_length - 3
    for index in range(count):
        sample = dataset[index]
        length = int(sample["padding_mask"].sum())
        assert sample["padding_mask"].tolist() == [1] * length + [0] * (len(sample["text"]) - length)
        assert not sample["text"][length:].any() and not sample["types"][length:].any()
        text, positions = sample["text"][:length], sample["loss_mask"][:length].astype(bool)
        assert text[0] == tokenizer.cls and text[-1] == tokenizer.sep and not positions[[0, -1]].any()
        real += length
        candidates += length - 1 - int((text == tokenizer.sep).sum())
        masked += int(positions.sum())
        as_mask += int((text[positions] == tokenizer.mask).sum())
        unchanged += int((text[positions] == sample["labels"][:length][positions]).sum())
        short += int(dataset.sample_index[index][2] < target)
    return dict(masked=masked / candidates, as_mask=as_mask / masked, unchanged=unchanged / masked,
                short=short / count)


def test_masking_statistics_follow_the_flags():
    args = parse_args(MODEL + ["--mask-prob", "0.3", "--short-seq-prob", "0.5", "--seq-length", "64"])
    tokenizer = bert.build_tokenizer(args)
    train, _ = bert.build_datasets(args, tokenizer)
    stats = sample_statistics(train, tokenizer, 300)
    assert stats["masked"] == pytest.approx(0.3, abs=0.02)
    assert stats["as_mask"] == pytest.approx(0.8, abs=0.04)  # Megatron's 80% [MASK], 10% random, 10% kept
    assert stats["unchanged"] == pytest.approx(0.1, abs=0.04)
    assert stats["short"] == pytest.approx(0.5, abs=0.08)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text, a SentencePiece tokenizer and the text preprocessed with and without sentence splitting."""
    root = tmp_path_factory.mktemp("bert-corpus")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in stdlib_documents()))
    model = load_tool("train_tokenizer").main(["--input", str(jsonl), "--output-prefix", str(root / "spm"),
                                               "--vocab-size", "1000"])
    preprocess = load_tool("preprocess_data").main
    for name, extra in (("sentences", ["--split-sentences"]), ("documents", [])):
        preprocess(["--input", str(jsonl), "--output-prefix", str(root / name), "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", model, "--workers", "1", *extra])
    return dict(root=root, model=model, sentences=str(root / "sentences_text_document"),
                documents=str(root / "documents_text_document"))


def corpus_args(corpus, prefix, *extra):
    base = [arg for arg in MODEL if arg not in ("--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                                                "500")]
    return parse_args(base + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["model"],
                              "--data-path", prefix, "--split", "9,1,0", "--seq-length", "64",
                              "--data-cache-path", str(corpus["root"] / "cache"), *extra])


def test_sentencepiece_vocabulary_gets_bert_special_tokens_and_whole_word_masking(corpus):
    args = corpus_args(corpus, corpus["sentences"])
    tokenizer = bert.build_tokenizer(args)
    # The model has no [CLS], [SEP] or [MASK]: appended after its 1000 pieces; its own pad piece is 3.
    assert (tokenizer.cls, tokenizer.sep, tokenizer.mask, tokenizer.pad, tokenizer.vocab_size) == (1000, 1001, 1002,
                                                                                                    3, 1003)
    assert args.padded_vocab_size == 1024
    assert not {1000, 1001, 1002, 3} & set(tokenizer.inv_vocab)
    # Pieces that continue a word read as WordPiece's: two words, each one start and its continuations.
    pieces = [tokenizer.inv_vocab[index] for index in tokenizer.base.tokenize("undocumented keywords")]
    assert len(pieces) > 2 and "".join(piece.removeprefix("##") for piece in pieces) == "▁undocumented▁keywords"
    assert sum(not piece.startswith("##") for piece in pieces) == 2
    continues = {index for index, piece in tokenizer.inv_vocab.items() if piece.startswith("##")}

    train, valid = bert.build_datasets(args, tokenizer)
    assert valid is not None
    stats = sample_statistics(train, tokenizer, 200)
    assert stats["masked"] == pytest.approx(0.15, abs=0.02)
    # Whole words are masked: the token before a masked word continuation is masked too (Megatron
    # joins a continuation at the start of a truncated segment to the word before the [SEP]).
    for index in range(200):
        sample = train[index]
        original = np.where(sample["loss_mask"], sample["labels"], sample["text"])
        for position in np.flatnonzero(sample["loss_mask"]):
            before = position - 1 - (original[position - 1] == tokenizer.sep)
            if sample["labels"][position] in continues and original[before] != tokenizer.cls:
                assert sample["loss_mask"][before], (index, position)


@pytest.mark.parametrize("pieces, pad, expected", [
    (["<unk>", "<pad>", "a", "[MASK]"], 1, (4, 5, 3, 6, 7)),  # pad id 1 would read as a real token: replaced
    (["<unk>", "[CLS]", "[SEP]", "a"], -1, (1, 2, 4, 5, 6)),  # no pad piece: appended
    (["[PAD]", "[CLS]", "[SEP]", "[MASK]"], 0, (1, 2, 3, 0, 4)),  # WordPiece's layout: nothing appended
])
def test_bert_special_tokens_are_the_vocabulary_s_or_appended(pieces, pad, expected):
    class Base:
        eod, unique_identifiers = 0, {}

    tokenizer = bert.BertTokenizer(Base(), pieces, [True] * len(pieces), pad)
    assert (tokenizer.cls, tokenizer.sep, tokenizer.mask, tokenizer.pad, tokenizer.vocab_size) == expected
    assert set(tokenizer.inv_vocab) == set(range(len(pieces))) - set(expected[:4])


def test_data_without_sentences_is_refused_for_the_sentence_order_head(corpus, capsys):
    with pytest.raises(SystemExit):
        corpus_args(corpus, corpus["documents"])
    error = capsys.readouterr().err
    assert f"the train part of {corpus['documents']}" in error and "--split-sentences" in error
    corpus_args(corpus, corpus["documents"], "--bert-no-binary-head")


def test_split_sentences():
    split = load_tool("preprocess_data").split_sentences
    assert split("One two. Three (four)! \"Five?\" 6 is a digit.\nA line. e.g. this") == [
        "One two.", "Three (four)!", "\"Five?\"", "6 is a digit.", "A line. e.g. this"]


def test_bert_resume_repeats_the_run_under_every_layout(tmp_path):
    """As GPT's: train 4 of 8 iterations under TP=1/PP=1, save, continue there and under TP=2, PP=2 and
    DP=2 (overlapped gradient reduction) with the same paths and losses (2 gloo processes)."""
    common = BASE + ["--global-batch-size", "8", "--train-iters", "8", "--lr-warmup-iters", "2", "--eval-interval",
                     "4", "--raptr-schedule", "2@0,3@0.5", "--raptr-sampling", "fixed-size"]
    ckpt = str(tmp_path / "ckpt")

    def argv(name, *extra):
        return common + ["--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra]

    run_distributed(_pretrain_each, 1, [argv("uninterrupted"), argv("first-half", "--save", ckpt, "--exit-interval", "4"),
                                        argv("resumed", "--load", ckpt)])
    run_distributed(_pretrain_each, 2, [
        argv("tp2", "--load", ckpt, "--tensor-model-parallel-size", "2", "--recompute-granularity", "selective"),
        argv("pp2", "--load", ckpt, "--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
             "--raptr-verify-sync", "1"),
        argv("dp2", "--load", ckpt, "--overlap-grad-reduce", "--raptr-verify-sync", "1"),
    ])
    reference = train_records(tmp_path, "uninterrupted")
    assert losses(train_records(tmp_path, "first-half")) == losses(reference[:4])
    for run in ("resumed", "tp2", "pp2", "dp2"):
        continued = train_records(tmp_path, run)
        assert [r["iteration"] for r in continued] == [5, 6, 7, 8], run
        assert [r["active_layers"] for r in continued] == [r["active_layers"] for r in reference[4:]], run
        assert losses(continued) == pytest.approx(losses(reference[4:]), rel=0 if run == "resumed" else 2e-5), run
        assert [r["sop_loss"] for r in continued] == pytest.approx([r["sop_loss"] for r in reference[4:]], rel=2e-5)

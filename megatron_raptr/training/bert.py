"""BERT (encoder) masked-LM pretraining: Megatron-Core's BertModel with RaPTr layers, trained on
megatron-core's masked word-piece dataset with Megatron-LM's BERT flags.

Data: the `.bin/.idx` format GPT uses, made with `tools/preprocess_data.py --split-sentences`, so
that each document is a sequence of sentences (samples are runs of whole sentences; the
sentence-order head swaps two spans of them).
"""

import argparse
from collections import OrderedDict
from functools import partial
from typing import Iterator, Optional, Sequence

import numpy as np
import sentencepiece as spm
import torch
from megatron.core.datasets import helpers
from megatron.core.datasets.bert_dataset import BERTMaskedWordPieceDataset, BERTMaskedWordPieceDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_raptr import megatron_internals as internals
from megatron_raptr.flops import bert_head_forward_flops_per_token
from megatron_raptr.layer import get_bert_raptr_layer_spec
from megatron_raptr.training import data, tokenizer
from megatron_raptr.training.gpt import language_model_kwargs, masked_mean_loss

# Megatron-LM's defaults; None until --model bert fills them, so that giving them to GPT is caught.
_DEFAULTS = {"mask_prob": 0.15, "short_seq_prob": 0.1, "bert_binary_head": True}
_FLAGS = {"mask_prob": "--mask-prob", "short_seq_prob": "--short-seq-prob", "bert_binary_head": "--bert-no-binary-head"}
# megatron-core's sample mapping skips documents holding a sentence longer than this (helpers.cpp).
LONG_SENTENCE_LEN = 512


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("BERT (--model bert)")
    group.add_argument("--mask-prob", type=float, default=None,
                       help="share of tokens to predict, 80%% of them replaced by [MASK], 10%% by a random "
                            f"token (default {_DEFAULTS['mask_prob']})")
    group.add_argument("--short-seq-prob", type=float, default=None,
                       help=f"probability of a sample shorter than --seq-length (default {_DEFAULTS['short_seq_prob']})")
    group.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head", default=None,
                       help="no sentence-order head: the loss is the masked-LM loss alone")


def validate_args(args: argparse.Namespace) -> None:
    """Fills the BERT defaults under --model bert; raises ValueError naming the flag."""
    given = [name for name in _DEFAULTS if getattr(args, name) is not None]
    if args.model != "bert":
        if given:
            raise ValueError(f"{_FLAGS[given[0]]} needs --model bert")
        return
    for name, default in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not 0 < args.mask_prob < 1:
        raise ValueError(f"--mask-prob must be between 0 and 1, got {args.mask_prob}")
    if not 0 <= args.short_seq_prob <= 1:
        raise ValueError(f"--short-seq-prob must be between 0 and 1, got {args.short_seq_prob}")
    for flag, used in (("--reset-position-ids", args.reset_position_ids),
                        ("--reset-attention-mask", args.reset_attention_mask),
                        ("--eod-mask-loss", args.eod_mask_loss),
                        ("--no-create-attention-mask-in-dataloader", not args.create_attention_mask_in_dataloader)):
        if used:
            raise ValueError(f"{flag} is a GPT data flag; BERT samples are sentence runs with a padding mask")
    if args.seq_length < 5:
        raise ValueError(f"--seq-length {args.seq_length} is too short for BERT: [CLS], two [SEP] and two tokens")
    if args.seed < 1:  # megatron-core's sample mapping requires it
        raise ValueError(f"--seed must be positive with --model bert, got {args.seed}")
    if args.sequence_parallel and internals.bert_lm_head_norm_impl.get() is WrappedTorchNorm:
        raise ValueError("--sequence-parallel with --model bert needs Apex: without it Megatron-Core's BERT head "
                         "falls back to a torch norm, which refuses sequence parallelism")


def validate_data(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag unless every dataset holds documents BERT can sample.

    megatron-core's sample mapping skips documents with fewer sentences than a sample needs (two
    with the sentence-order head) and those with a sentence over 512 tokens, and never ends on a
    dataset without any. Run after data.validate_data_args (the files are sound).
    """
    if args.mock_data:
        return
    min_sentences = 2 if args.bert_binary_head else 1
    what = (f"document BERT can sample ({min_sentences} or more sentences, each at most {LONG_SENTENCE_LEN} "
            f"tokens): preprocess with tools/preprocess_data.py --split-sentences"
            + (", or train with --bert-no-binary-head" if args.bert_binary_head else ""))
    for flag, values in (("--data-path", args.data_path), ("--train-data-path", args.train_data_path),
                         ("--valid-data-path", args.valid_data_path)):
        for prefix in data.parse_blend(values, flag)[0] if values else ():
            dataset = IndexedDataset(prefix)
            usable = samplable_documents(dataset.document_indices, dataset.sequence_lengths, min_sentences)
            if flag == "--data-path":
                data.check_split_parts(args.split, prefix, usable, what)
            elif not usable.any():
                raise ValueError(f"{flag}: {prefix} holds no {what}")


def samplable_documents(document_indices: np.ndarray, sentence_lengths: np.ndarray, min_sentences: int) -> np.ndarray:
    """Per document, whether megatron-core's BERT sample mapping draws samples from it."""
    sentences = np.diff(document_indices)
    long_sentences = np.concatenate([[0], np.cumsum(sentence_lengths > LONG_SENTENCE_LEN)])
    has_long = long_sentences[document_indices[1:]] > long_sentences[document_indices[:-1]]
    return (sentences >= min_sentences) & ~(has_long & (sentences > 1))


class BertTokenizer:
    """A tokenizer's vocabulary with BERT's special tokens, as megatron-core's masked dataset reads it.

    [CLS], [SEP] and [MASK] are the vocabulary's pieces of those names, else ids appended after it
    (as Megatron-LM's SentencePiece tokenizer adds them); the pad id is the tokenizer's, else an
    appended one. Megatron's dataset marks real tokens with 1 in its padding mask and padding with
    the pad id, so a pad id of 1 is replaced too. `inv_vocab` holds the ids data can contain: a
    SentencePiece piece that continues a word (no leading '▁') reads '##piece', so whole-word
    masking sees SentencePiece's words as it sees WordPiece's, and the special ids are left out,
    so random replacements never produce them.
    """

    def __init__(self, base, pieces: Sequence[str], word_starts: Sequence[bool], pad: int):
        self.base = base
        self.eod = base.eod
        self.vocab_size = len(pieces)
        ids = {piece: index for index, piece in enumerate(pieces)}
        self.cls, self.sep, self.mask = (ids[name] if name in ids else self._append() for name in ("[CLS]", "[SEP]", "[MASK]"))
        self.pad = pad if pad >= 0 and pad != 1 else self._append()
        specials = {self.cls, self.sep, self.mask, self.pad}
        self.inv_vocab = {index: piece if start else "##" + piece
                          for index, (piece, start) in enumerate(zip(pieces, word_starts)) if index not in specials}

    def _append(self) -> int:
        self.vocab_size += 1
        return self.vocab_size - 1

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core's dataset cache keys on."""
        return OrderedDict(base=self.base.unique_identifiers, cls=self.cls, sep=self.sep, mask=self.mask, pad=self.pad)


def build_tokenizer(args: argparse.Namespace) -> BertTokenizer:
    base = tokenizer.build_tokenizer(args)
    if args.tokenizer_type == "SentencePieceTokenizer":
        model = spm.SentencePieceProcessor(model_file=args.tokenizer_model)
        pieces = [model.id_to_piece(index) for index in range(model.get_piece_size())]
        starts = [piece.startswith("▁") or model.is_control(index) or model.is_unknown(index)
                  for index, piece in enumerate(pieces)]
        return BertTokenizer(base, pieces, starts, model.pad_id())
    pieces = [str(index) for index in range(base.vocab_size)]  # NullTokenizer: ids are their text; the last is EOD
    return BertTokenizer(base, pieces, [True] * len(pieces), pad=-1)


class BertDataset(BERTMaskedWordPieceDataset):
    """Megatron-Core's BERT masked word-piece dataset, its samples as the forward step takes them.

    Megatron's padding_mask holds the pad id on padding (right only for WordPiece's pad id 0) and
    its token types are padded with it: here padding_mask is 1 on real tokens and 0 on padding, and
    types are 0 on padding. Without the sentence-order head there are no types or is_random: the
    model then has no token-type embedding.
    """

    def __getitem__(self, idx: int) -> dict:
        sample = super().__getitem__(idx)
        real = sample["padding_mask"] == 1
        out = {key: sample[key] for key in ("text", "labels", "loss_mask")}
        out["padding_mask"] = real.astype(np.int64)
        if self.config.classification_head:
            out["types"] = np.where(real, sample["types"], 0)
            out["is_random"] = np.int64(sample["is_random"])
        return out


class MockSentences:
    """Synthetic documents for --mock-data: 2 to 6 sentences of 8 to 64 tokens, each sentence a run of
    consecutive ordinary ids (as Megatron's mock GPT data), so masked tokens follow from their
    neighbours; runs start at Zipf-distributed ids, so token frequencies are skewed as in text."""

    documents = 10000

    def __init__(self, bert_tokenizer: BertTokenizer):
        rng = np.random.default_rng(0)
        self.ids = np.array(sorted(bert_tokenizer.inv_vocab), dtype=np.int64)
        sentences = rng.integers(2, 7, size=self.documents)
        self.document_indices = np.concatenate([[0], np.cumsum(sentences)]).astype(np.int64)
        self.sequence_lengths = rng.integers(8, 65, size=self.document_indices[-1], dtype=np.int32)
        self.starts = rng.zipf(1.5, size=self.document_indices[-1]) - 1

    def __getitem__(self, sentence: int) -> np.ndarray:
        return self.ids[(self.starts[sentence] + np.arange(self.sequence_lengths[sentence])) % len(self.ids)]


class MockBertDataset(BertDataset):
    """BertDataset on MockSentences: no files; every rank builds the sample index in memory."""

    @staticmethod
    def build_low_level_dataset(dataset_path, config: BERTMaskedWordPieceDatasetConfig) -> MockSentences:
        return MockSentences(config.tokenizer)

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> np.ndarray:
        # As MaskedWordPieceDataset's, without its on-disk cache (rank 0 writes, the others read).
        documents = np.append(self.indices, self.indices[-1] + 1)
        return helpers.build_mapping(
            self.dataset.document_indices[documents], self.dataset.sequence_lengths, np.iinfo(np.int32).max - 1,
            self.num_samples, sequence_length, self.config.short_sequence_probability, self.config.random_seed,
            False, min_sentences_per_sample,
        )


def build_datasets(args: argparse.Namespace, bert_tokenizer: BertTokenizer):
    """(train, valid) masked-LM datasets with Megatron-LM's masking (whole words, n-grams up to 3)."""
    config = BERTMaskedWordPieceDatasetConfig(
        **data.blend_config(args, bert_tokenizer),
        masking_probability=args.mask_prob,
        short_sequence_probability=args.short_seq_prob,
        masking_max_ngram=3,
        masking_do_full_word=True,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        classification_head=args.bert_binary_head,
    )
    return data.build_split_datasets(MockBertDataset if config.mock else BertDataset, config, args)


def build_model(args: argparse.Namespace, config: TransformerConfig, vp_stage: Optional[int] = None) -> BertModel:
    """This pipeline stage's BERT (its chunk of virtual stage `vp_stage`) with RaPTr-gated layers (unwrapped)."""
    return BertModel(
        transformer_layer_spec=get_bert_raptr_layer_spec(),
        num_tokentypes=2 if args.bert_binary_head else 0,
        add_binary_head=args.bert_binary_head,
        **language_model_kwargs(args, config, vp_stage),
    )


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = data.stage_batch(data_iterator, first_stage=("text", "types"), last_stage=("labels", "loss_mask", "is_random"),
                             every_stage=("padding_mask",))  # every stage's attention needs the padding mask
    output = model(batch.get("text"), batch["padding_mask"], tokentype_ids=batch.get("types"),
                   lm_labels=batch.get("labels"))
    return output, partial(_loss, batch.get("loss_mask"), batch.get("is_random"))


def _loss(loss_mask: torch.Tensor, sentence_order, output):
    """Megatron-LM's BERT loss: masked-LM ("lm loss"), plus the sentence-order loss with its head."""
    per_token_loss, sentence_order_logits = output
    loss, reported = masked_mean_loss(loss_mask, per_token_loss)
    if sentence_order_logits is None:
        return loss, reported
    sop_loss = torch.nn.functional.cross_entropy(sentence_order_logits.view(-1, 2).float(), sentence_order.view(-1))
    reported["sop loss"] = sop_loss.detach().clone()
    return loss + sop_loss, reported


def head_flops_per_token(args: argparse.Namespace, config: TransformerConfig) -> float:
    return bert_head_forward_flops_per_token(config, args.seq_length, args.bert_binary_head)

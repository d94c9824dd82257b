"""Tokenizers for training and for the data tools, on megatron-core's tokenizer classes.

Training (`pretrain_raptr.py`), `tools/preprocess_data.py` and `tools/train_tokenizer.py` all go
through this module, so that the flags, the special-token ids and the tokenizer that writes the
`.bin` files are the one the model trains with.
"""

import json
import os
from typing import Iterable, Iterator, List, Optional, Sequence

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizer
from megatron.core.tokenizers import megatron_tokenizer

TOKENIZER_TYPES = ("SentencePieceTokenizer", "NullTokenizer")

# Megatron-Core 0.16 calls the synthetic-token library "null", later releases "null-text".
_NULL_LIBRARY = "null" if "null" in getattr(megatron_tokenizer, "TOKENIZER_LIBRARIES", ()) else "null-text"

# SentencePiece's default order (unk, bos, eos) plus a real pad piece. Megatron-core uses
# eod = eos for SentencePiece, so documents end with id 2; the pad id never occurs in the data.
SENTENCEPIECE_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}

# SentencePiece's trainer silently drops lines longer than this many bytes.
SENTENCEPIECE_MAX_LINE_BYTES = 4192


def add_tokenizer_args(parser):
    """Megatron-LM's tokenizer flags (the subset this project supports)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=None,
        help="SentencePieceTokenizer (needs --tokenizer-model) or NullTokenizer (needs "
        "--vocab-size; ids are the whitespace-separated integers of the text).",
    )
    group.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model file (tools/train_tokenizer.py)."
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="NullTokenizer: ids 0..N-1 plus an end-of-document id N, so its vocabulary is N+1 "
        "(as in Megatron-LM).",
    )
    return parser


def validate_tokenizer_args(args) -> None:
    """Raise ValueError naming the flag when the tokenizer flags cannot build a tokenizer."""
    if args.tokenizer_type is None:
        raise ValueError(
            "--tokenizer-type is required: SentencePieceTokenizer with --tokenizer-model PATH, "
            "or NullTokenizer with --vocab-size N"
        )
    if args.tokenizer_type == "SentencePieceTokenizer":
        if not args.tokenizer_model:
            raise ValueError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model PATH")
        if not os.path.isfile(args.tokenizer_model):
            raise ValueError(f"--tokenizer-model: file not found: {args.tokenizer_model}")
    elif args.tokenizer_type == "NullTokenizer":
        if args.vocab_size is None or args.vocab_size <= 0:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (N > 0)")


def build_tokenizer(args):
    """Build the tokenizer named by --tokenizer-type.

    Returns a megatron-core text tokenizer (`MegatronTokenizerBase`), which GPTDatasetConfig
    accepts and which exposes `vocab_size`, `eod`, `tokenize(text) -> list[int]` and
    `detokenize(ids) -> str` (and for SentencePiece `bos`, `eos`, `pad`).
    """
    validate_tokenizer_args(args)
    if args.tokenizer_type == "SentencePieceTokenizer":
        try:
            return MegatronTokenizer.from_pretrained(
                tokenizer_path=args.tokenizer_model,
                metadata_path={"library": "sentencepiece", "model_type": "gpt"},
            )
        except RuntimeError as err:  # SentencePiece's load error
            raise ValueError(
                f"--tokenizer-model: {args.tokenizer_model} is not a SentencePiece model ({err})"
            ) from None
    return MegatronTokenizer.from_pretrained(
        metadata_path={"library": _NULL_LIBRARY}, vocab_size=args.vocab_size
    )


def json_fields(line: str, keys: Sequence[str], where: str) -> Optional[List[str]]:
    """The string fields `keys` of one JSON-lines document; None for a blank line.

    Raises ValueError naming `where` (e.g. "file:line") for bad JSON or a missing field.
    """
    if not line.strip():
        return None
    try:
        document = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON line ({err})") from None
    fields = [document.get(key) if isinstance(document, dict) else None for key in keys]
    for key, field in zip(keys, fields):
        if not isinstance(field, str):
            raise ValueError(f"{where}: no string field {key!r} (see --json-keys)")
    return fields


def split_long_line(line: str, max_bytes: int = SENTENCEPIECE_MAX_LINE_BYTES) -> Iterator[str]:
    """Cut `line` at whitespace into pieces of at most `max_bytes` UTF-8 bytes.

    A run without whitespace longer than `max_bytes` is cut at a character boundary.
    """
    while len(line.encode("utf-8")) > max_bytes:
        # The longest prefix that fits, in characters (a character is at most 4 bytes).
        head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        cut = max(head.rfind(" "), head.rfind("\t"))
        if cut <= 0:
            cut = len(head)
        yield line[:cut]
        line = line[cut:].lstrip(" \t")
    if line:
        yield line


def sentencepiece_training_lines(
    texts: Iterable[str], max_bytes: int = SENTENCEPIECE_MAX_LINE_BYTES
) -> Iterator[str]:
    """One training sentence per non-empty line of each text, long lines split at whitespace."""
    for text in texts:
        for line in text.splitlines():
            yield from split_long_line(line.strip(), max_bytes)


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    input_sentence_size: int = 0,
    num_threads: int = 0,
    seed: int = 1234,
) -> str:
    """Train a SentencePiece model on `texts`; return the path of the written `.model`.

    Llama-style settings: no normalisation or whitespace folding (so detokenize(tokenize(text))
    gives the text back, newlines included, through byte fallback), digits split, and the ids of
    SENTENCEPIECE_SPECIAL_IDS. The `.model` and `.vocab` files are written under temporary
    names and renamed when complete (the pieces are deterministic; the .model also records the
    trainer settings, temporary name and thread count included). `input_sentence_size` > 0 trains on that many sentences
    sampled from the input (0: all of them).
    """
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    spm.set_random_generator_seed(seed)  # the sentence sampling of input_sentence_size
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentencepiece_training_lines(texts),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=SENTENCEPIECE_MAX_LINE_BYTES,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
            **SENTENCEPIECE_SPECIAL_IDS,
        )
        # .vocab first: a present .model marks a complete pair.
        os.replace(f"{tmp_prefix}.vocab", f"{output_prefix}.vocab")
        os.replace(f"{tmp_prefix}.model", f"{output_prefix}.model")
    finally:
        for suffix in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    return f"{output_prefix}.model"

#!/usr/bin/env python3
"""Train a SentencePiece tokenizer on JSON-lines text, for --tokenizer-type SentencePieceTokenizer.

Writes OUTPUT_PREFIX.model and OUTPUT_PREFIX.vocab. Ids: unk 0, bos 1, eos 2 (= Megatron's EOD),
pad 3; byte fallback, so any text round-trips. Lines longer than SentencePiece's limit (which
it would silently skip) are split at whitespace first.

    python tools/train_tokenizer.py --input data/corpus/train.jsonl \
        --output-prefix data/tokenizer/spm8000 --vocab-size 8000
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_raptr.training.tokenizer import json_fields, train_sentencepiece  # noqa: E402


def iter_json_texts(paths, keys):
    """The string fields `keys` of every JSON line of `paths`, in order."""
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                yield from json_fields(line, keys, f"{path}:{number}") or ()


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSON-lines file(s).")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="Fields to train on.")
    parser.add_argument("--output-prefix", required=True, help="Writes PREFIX.model/.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=["bpe", "unigram", "char", "word"], default="bpe")
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="Train on this many sampled lines (0: all); bounds memory on large corpora.",
    )
    parser.add_argument("--workers", type=int, default=0, help="Threads (0: all cores).")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the line sampling.")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = get_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            raise ValueError(f"--input: file not found: {path}")
    start = time.time()
    model = train_sentencepiece(
        iter_json_texts(args.input, args.json_keys),
        args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=args.input_sentence_size,
        num_threads=args.workers,
        seed=args.seed,
    )
    print(f"wrote {model} ({args.vocab_size} pieces) in {time.time() - start:.1f}s", file=sys.stderr)
    return model


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as err:
        sys.exit(f"error: {err}")

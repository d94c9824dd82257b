#!/usr/bin/env python3
"""Tokenize JSON lines into a Megatron indexed dataset (.bin/.idx), as Megatron-LM's tool.

Each input line is one JSON document; for every --json-keys KEY this writes
{output_prefix}_{KEY}_document.bin/.idx with one sequence per document (followed by the
tokenizer's EOD id with --append-eod), or with --split-sentences one sequence per sentence, the
document's sentences grouped as one document (BERT's data: its samples are runs of sentences).
Documents whose text is empty are skipped. The files are written under temporary names and
renamed only when complete, the .idx last, so a present .idx marks a finished pair.

    python tools/preprocess_data.py --input data/corpus/train.jsonl \
        --output-prefix data/tokenized/train --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model data/tokenizer/spm8000.model --append-eod --workers 2
"""

import argparse
import functools
import multiprocessing
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_raptr.training.tokenizer import (  # noqa: E402
    add_tokenizer_args,
    build_tokenizer,
    json_fields,
    validate_tokenizer_args,
)

_worker_tokenizer = None  # each worker process's own, built by _init_worker

# A sentence ends at . ! or ? (and a closing quote or bracket) before whitespace and a capital,
# digit or opening quote; lines end sentences too. Rule-based, where Megatron-LM uses NLTK's
# punkt, whose model is a separate download.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text):
    """The non-empty sentences of `text`, whitespace around them removed."""
    return [sentence for line in text.splitlines()
            for sentence in (part.strip() for part in _SENTENCE_END.split(line)) if sentence]


def _init_worker(args) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(args)


def _encode(numbered_line, path, keys, append_eod, sentences):
    """(line number, JSON line) -> ({key: token ids of each sentence} or None for a blank line, its bytes).

    Without `sentences` a document is one sentence.
    """
    number, line = numbered_line
    size = len(line.encode("utf-8"))
    fields = json_fields(line, keys, f"{path}:{number}")
    if fields is None:
        return None, size
    ids = {}
    for key, text in zip(keys, fields):
        parts = split_sentences(text) if sentences else [text]
        # An empty field stays one empty sequence, so every key's dataset keeps every document.
        ids[key] = [sentence for sentence in map(_worker_tokenizer.tokenize, parts) if sentence] or [[]]
        if append_eod and ids[key][-1]:
            ids[key][-1].append(_worker_tokenizer.eod)
    return ids, size


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="JSON-lines file(s), in order.")
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="Fields to tokenize (default: text)."
    )
    group.add_argument(
        "--split-sentences",
        action="store_true",
        help="One sequence per sentence, grouped by document (BERT's data).",
    )
    add_tokenizer_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="Writes PREFIX_KEY_document.bin/.idx")
    group.add_argument(
        "--append-eod", action="store_true", help="End every document with the EOD token."
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="Tokenizer processes.")
    group.add_argument(
        "--log-interval", type=int, default=1000, help="Progress line every N documents."
    )
    return parser.parse_args(argv)


def output_prefixes(output_prefix, keys):
    """Megatron-LM's output names: {output_prefix}_{key}_document."""
    return {key: f"{output_prefix}_{key}_document" for key in keys}


def main(argv=None) -> None:
    args = get_args(argv)
    validate_tokenizer_args(args)
    for path in args.input:
        if not os.path.isfile(path):
            raise ValueError(f"--input: file not found: {path}")
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    tokenizer = build_tokenizer(args)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    finals = output_prefixes(args.output_prefix, args.json_keys)
    temps = {key: f"{prefix}.tmp-{os.getpid()}" for key, prefix in finals.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)

    builders = {key: IndexedDatasetBuilder(get_bin_path(temps[key]), dtype) for key in temps}
    documents, tokens, nbytes, start = 0, dict.fromkeys(finals, 0), 0, time.time()
    try:
        with multiprocessing.Pool(args.workers, _init_worker, (args,)) as pool:
            for path in args.input:
                encode = functools.partial(
                    _encode, path=path, keys=args.json_keys, append_eod=args.append_eod,
                    sentences=args.split_sentences,
                )
                with open(path, encoding="utf-8") as lines:
                    for ids, size in pool.imap(encode, enumerate(lines, 1), chunksize=64):
                        nbytes += size
                        if ids is None or not any(map(any, ids.values())):
                            continue
                        for key, sentences in ids.items():
                            lengths = [len(sentence) for sentence in sentences]
                            builders[key].add_document(sum(sentences, []), lengths)
                            tokens[key] += sum(lengths)
                        documents += 1
                        if documents % args.log_interval == 0:
                            elapsed = time.time() - start
                            print(
                                f"processed {documents} documents ({documents / elapsed:.0f} "
                                f"docs/s, {nbytes / elapsed / 2**20:.2f} MB/s)",
                                file=sys.stderr,
                            )
        for key, builder in builders.items():
            builder.finalize(get_idx_path(temps[key]))
        for key, final in finals.items():
            if os.path.exists(get_idx_path(final)):
                os.remove(get_idx_path(final))
            os.replace(get_bin_path(temps[key]), get_bin_path(final))
            os.replace(get_idx_path(temps[key]), get_idx_path(final))
    finally:
        for key, builder in builders.items():
            builder.data_file.close()
            for path in (get_bin_path(temps[key]), get_idx_path(temps[key])):
                if os.path.exists(path):
                    os.remove(path)
    summary = ", ".join(f"{finals[key]}: {count} tokens" for key, count in tokens.items())
    print(f"{documents} documents in {time.time() - start:.1f}s; {summary}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")

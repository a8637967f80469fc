"""``mimo-train prepare-data``: raw text (jsonl, plain text, parquet) to tokenized webdataset shards + manifest.

The work is planned before anything is tokenized: one scan of the inputs assigns every document to a shard
(by document count, or by an estimated token count), so shard ``i`` always holds the same documents. Worker
processes then tokenize and write the shards independently. Each shard is written to a hidden partial file and
renamed into place when complete, and its record (documents, tokens, sha256) is saved next to the plan; a
restarted run skips the shards whose record is still valid (the record holds a hash of the exact input bytes of
the shard's documents), so a killed run costs at most the shards in flight, a fixed input file redoes only the
shards whose documents changed, and no reader ever sees half a shard. ``manifest.json`` is written last.

Undecodable input (bytes that are not UTF-8, or a lone surrogate escape such as ``"\\ud800"`` in a JSON string,
which no tokenizer can encode) follows ``--on-decode-error``: ``replace`` (the default) puts U+FFFD in place of
each offending sequence and keeps the document; ``skip`` drops the document. Either way the offending sequences
are counted per file and the first few ``file:line`` positions are reported at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import hashlib
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .builtin_corpus import CORPUS_BYTES, CORPUS_TAG, HELDOUT_BYTES, SHARD_DOCUMENTS, ensure_builtin_tokenizer, \
    stdlib_source_files
from .config import BUILTIN_TOKENIZER, CACHE_ENV_VAR
from .locking import file_lock
from .shards import MANIFEST_NAME, Manifest, ShardInfo, write_atomically, write_token_shard
from .tokenizer import eos_token_id, file_sha256, load_tokenizer

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")  # one document per file
INPUT_SUFFIXES = (".jsonl", ".parquet", *TEXT_SUFFIXES)
DEFAULT_SHARD_TOKENS = 1 << 26  # ~256 MB of uint32 ids per shard, a usual webdataset shard size
ESTIMATE_SAMPLE_BYTES = 1 << 20  # text tokenized to estimate bytes per token for --shard-tokens
WORK_DIR = ".prepare"  # plan and per-shard records, inside the output directory
DECODE_POLICIES = ("replace", "skip")
REPORTED_POSITIONS = 5  # offending file:line positions printed at the end
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Segment:
    """Documents ``[first, stop)`` of one input file; ``byte_offset`` is where document ``first`` starts (jsonl)."""
    file: str
    first: int
    stop: int
    byte_offset: int = 0
    line: int = 1  # line number of document ``first`` (jsonl), for messages


@dataclass
class DecodeProblems:
    """Undecodable sequences met while reading one shard's documents: counts per file, first positions."""
    counts: dict
    positions: list

    def add(self, file: str, line: int, count: int) -> None:
        self.counts[file] = self.counts.get(file, 0) + count
        if len(self.positions) < REPORTED_POSITIONS:
            self.positions.append(f"{file}:{line}")


def decode_text(data: bytes, file: str, line: int, problems: DecodeProblems) -> tuple[str, int]:
    """UTF-8 text with each undecodable sequence replaced by U+FFFD, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as error:
        text = data.decode("utf-8", errors="replace")
        count = text.count("\ufffd") - data.count("\ufffd".encode())
        problems.add(file, line + data[: error.start].count(b"\n"), count)
        return text, count


def clean_surrogates(text: str, file: str, line: int, problems: DecodeProblems) -> tuple[str, int]:
    """A lone surrogate (from a JSON escape) cannot be encoded as UTF-8: replaced by U+FFFD, and counted."""
    text, count = LONE_SURROGATE.subn("\ufffd", text)
    if count:
        problems.add(file, line, count)
    return text, count


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
    """(byte offset, size in bytes, line number) of each document of a file, without parsing jsonl records."""
    if path.endswith(".jsonl"):
        offset = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield offset, len(line), number
                offset += len(line)
    elif path.endswith(".parquet"):
        for index, text in enumerate(_parquet_texts(path, text_field)):
            yield 0, len(text.encode("utf-8", errors="surrogatepass")), index + 1
    else:
        yield 0, os.path.getsize(path), 1


def read_documents(segment: Segment, text_field: str, policy: str = "replace",
                   problems: DecodeProblems | None = None) -> list[str]:
    """The texts of a segment's documents, undecodable ones replaced or skipped per ``policy`` (see the top)."""
    problems = problems if problems is not None else DecodeProblems({}, [])
    texts = []
    for line, raw in _raw_documents(segment, text_field):
        if isinstance(raw, bytes):
            raw, bad = decode_text(raw, segment.file, line, problems)
        else:
            bad = 0
        if segment.file.endswith(".jsonl"):
            try:
                record = json.loads(raw)
            except ValueError as error:
                raise ValueError(f"{segment.file}:{line}: not a JSON record: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{segment.file}:{line}: no string field {text_field!r}")
            raw = record[text_field]
        text, surrogates = clean_surrogates(raw, segment.file, line, problems)
        if policy == "skip" and bad + surrogates:
            continue
        texts.append(text)
    return texts


def _raw_documents(segment: Segment, text_field: str):
    """(line number, bytes or str) of each document of a segment."""
    if segment.file.endswith(".jsonl"):
        with open(segment.file, "rb") as f:
            f.seek(segment.byte_offset)
            line, found = segment.line, 0
            while found < segment.stop - segment.first:
                data = f.readline()
                if not data:
                    raise ValueError(f"{segment.file}: ended early (was it changed during preparation?)")
                if data.strip():
                    yield line, data
                    found += 1
                line += 1
    elif segment.file.endswith(".parquet"):
        texts = _parquet_texts(segment.file, text_field)[segment.first : segment.stop]
        yield from ((segment.first + 1 + i, text) for i, text in enumerate(texts))
    else:
        with open(segment.file, "rb") as f:
            yield 1, f.read()


def segments_fingerprint(segments: list[Segment], text_field: str) -> str:
    """sha256 of exactly what a shard reads (its documents' bytes), to tell whether a finished shard is valid."""
    digest = hashlib.sha256()
    for segment in segments:
        digest.update(repr((os.path.abspath(segment.file), segment.first, segment.stop)).encode())
        for _, raw in _raw_documents(segment, text_field):
            digest.update(raw if isinstance(raw, bytes) else raw.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()


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
        for index, (offset, nbytes, line) in enumerate(document_sizes(path, text_field)):
            if current and current[-1].file == path and current[-1].stop == index:
                current[-1].stop += 1
            else:
                current.append(Segment(path, index, index + 1, offset, line))
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
        for index, (offset, nbytes, line) in enumerate(document_sizes(path, text_field)):
            texts += read_documents(Segment(path, index, index + 1, offset, line), text_field)
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


def _write_shard(task) -> tuple[ShardInfo, DecodeProblems]:
    index, segments, out_dir, text_field, policy, fingerprint = task
    problems = DecodeProblems({}, [])
    texts = [text for segment in segments for text in read_documents(segment, text_field, policy, problems) if text]
    encodings = _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    info = write_token_shard(os.path.join(out_dir, shard_name(index)),
                             (np.asarray(e.ids, dtype=np.uint32) for e in encodings))
    # the record is written after the shard is in place: a record always describes a complete shard
    record = {"shard": asdict(info), "inputs_sha256": fingerprint, "policy": policy, "decode": asdict(problems)}
    write_atomically(record_path(out_dir, index), json.dumps(record).encode())
    return info, problems


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"shard-{index:06d}.json")


def finished_shard(out_dir: str, index: int, fingerprint: str, policy: str) -> tuple[ShardInfo, DecodeProblems] | None:
    """The record of a complete shard made from exactly these input bytes with this policy, else None."""
    try:
        with open(record_path(out_dir, index)) as f:
            record = json.load(f)
        info, problems = ShardInfo(**record["shard"]), DecodeProblems(**record["decode"])
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None
    if (record.get("inputs_sha256"), record.get("policy")) != (fingerprint, policy):
        return None  # its input changed (e.g. was fixed) since: the shard is redone
    path = os.path.join(out_dir, info.url)
    return (info, problems) if os.path.exists(path) and os.path.getsize(path) == info.filesize else None


def report_decode_problems(results: list[DecodeProblems], policy: str) -> str:
    """One line on undecodable input (empty if there was none)."""
    counts: dict = {}
    positions: list = []
    for problems in results:
        for file, count in problems.counts.items():
            counts[file] = counts.get(file, 0) + count
        positions += problems.positions
    if not counts:
        return ""
    action = "replaced by U+FFFD" if policy == "replace" else "skipped (their documents dropped)"
    per_file = ", ".join(f"{file}: {count}" for file, count in sorted(counts.items()))
    return (f"prepare-data: {sum(counts.values())} undecodable sequences {action} (--on-decode-error {policy}) in "
            f"{len(counts)} files ({per_file}); first at {', '.join(positions[:REPORTED_POSITIONS])}")


# ---- the whole preparation -----------------------------------------------------------------------------------

def prepare_dataset(inputs: list[str], out_dir: str, tokenizer_path: str, *, workers: int = 1,
                    shard_docs: int | None = None, shard_tokens: int | None = None, text_field: str = "text",
                    progress: bool = True, on_decode_error: str = "replace") -> Manifest:
    """Tokenize ``inputs`` into shards under ``out_dir`` and write its manifest; resumes an interrupted run (also
    after an input was fixed: only the shards whose input bytes changed are redone)."""
    shard_tokens = _checked_shard_size(on_decode_error, shard_docs, shard_tokens)
    files = expand_inputs(inputs)
    if not any(os.path.getsize(f) for f in files):
        raise ValueError(f"inputs {' '.join(inputs)}: every input file is empty; nothing to tokenize")
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer_sha = file_sha256(tokenizer_path)

    os.makedirs(os.path.join(out_dir, WORK_DIR), exist_ok=True)
    # The options and the input files (by name) fix the plan; their contents are checked per shard (fingerprints).
    plan_key = {
        "inputs": [os.path.abspath(f) for f in files],
        "shard_docs": shard_docs, "shard_tokens": shard_tokens, "text_field": text_field,
        "tokenizer_sha256": tokenizer_sha,
    }
    bytes_per_token = _stored_bytes_per_token(out_dir, plan_key, files, tokenizer_path)
    plan = plan_shards(files, text_field, shard_docs, shard_tokens * bytes_per_token if shard_tokens else None)
    fingerprints = [segments_fingerprint(segments, text_field) for segments in plan]
    results = [finished_shard(out_dir, i, fingerprints[i], on_decode_error) for i in range(len(plan))]
    todo = [(i, plan[i], out_dir, text_field, on_decode_error, fingerprints[i])
            for i, result in enumerate(results) if result is None]
    _write_shards(todo, results, tokenizer_path, workers, progress)

    if not sum(info.tokens for info, _ in results):  # a dataset of no tokens would fail every run
        raise ValueError(f"inputs {' '.join(inputs)}: no tokens (empty records, or every document skipped by "
                         f"--on-decode-error {on_decode_error}); no manifest written to {out_dir}")
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, ".tokenizer.json.partial"))
    os.replace(os.path.join(out_dir, ".tokenizer.json.partial"), os.path.join(out_dir, "tokenizer.json"))
    report = report_decode_problems([problems for _, problems in results], on_decode_error)
    if report:
        print(report, file=sys.stderr)
    manifest = Manifest(
        shards=[info for info, _ in results],
        eos_id=eos_token_id(tokenizer),
        tokenizer={"file": "tokenizer.json", "sha256": tokenizer_sha, "vocab_size": tokenizer.get_vocab_size()},
    )
    write_atomically(os.path.join(out_dir, MANIFEST_NAME), manifest.to_json().encode())
    return manifest


def _checked_shard_size(on_decode_error: str, shard_docs: int | None, shard_tokens: int | None) -> int | None:
    """The options checked; `shard_tokens` as used (the default when neither shard size is given)."""
    if on_decode_error not in DECODE_POLICIES:
        raise ValueError(f"--on-decode-error: must be one of {', '.join(DECODE_POLICIES)}, got {on_decode_error!r}")
    if shard_docs is not None and shard_tokens is not None:
        raise ValueError("give --shard-docs or --shard-tokens, not both")
    if shard_docs is None and shard_tokens is None:
        shard_tokens = DEFAULT_SHARD_TOKENS
    if (shard_docs is not None and shard_docs < 1) or (shard_tokens is not None and shard_tokens < 1):
        raise ValueError("--shard-docs / --shard-tokens must be >= 1")
    return shard_tokens


def _stored_bytes_per_token(out_dir: str, plan_key: dict, files: list[str], tokenizer_path: str) -> float | None:
    """The plan's bytes per token: read back from `out_dir`'s plan (refused when it was made for other inputs or
    options), or measured once and kept, so a fixed input does not move every shard boundary."""
    plan_file = os.path.join(out_dir, WORK_DIR, "plan.json")
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            stored = json.load(f)
        if {k: v for k, v in stored.items() if k != "bytes_per_token"} != plan_key:
            raise ValueError(f"{out_dir} holds a preparation of other inputs or options; use another --out")
        return stored.get("bytes_per_token")
    text_field = plan_key["text_field"]
    bytes_per_token = (estimate_bytes_per_token(files, text_field, tokenizer_path) if plan_key["shard_tokens"]
                       else None)
    write_atomically(plan_file, json.dumps({**plan_key, "bytes_per_token": bytes_per_token}).encode())
    return bytes_per_token


def _write_shards(todo: list[tuple], results: list, tokenizer_path: str, workers: int, progress: bool) -> None:
    """Tokenize and write the shards of `todo`, each result into its place in `results`, with a progress bar."""
    total = len(results)
    with tqdm(total=total, initial=total - len(todo), desc="prepare-data", unit="shard", disable=not progress) as bar:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(tokenizer_path)
            written = map(_write_shard, todo)
            pool = None
        else:
            # each process tokenizes one shard at a time; the Rust thread pool would only oversubscribe the cores
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer_path,))
            written = pool.imap(_write_shard, todo)
        try:
            for (index, *_), result in zip(todo, written):
                results[index] = result
                bar.update(1)
        finally:
            if pool is not None:
                pool.terminate()


def resolve_tokenizer(spec: str, cache_dir: str, vocab_size: int) -> str:
    """A tokenizer.json path for "builtin" (trained and cached on first use) or a given path."""
    if spec == BUILTIN_TOKENIZER:
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
    parser.add_argument("--cache-dir", default=os.environ.get(CACHE_ENV_VAR)
                        or os.path.join(os.path.expanduser("~"), ".cache", "mimo-train"),
                        help="where the builtin tokenizer is cached (default: $MIMO_TRAIN_CACHE, else ~/.cache/mimo-train)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="tokenizer processes (default: the CPU count, at most 8)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-docs", type=int, help="documents per shard")
    size.add_argument("--shard-tokens", type=int, help=f"approximate tokens per shard (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--text-field", default="text", help="the text field of jsonl / parquet records")
    parser.add_argument("--on-decode-error", choices=DECODE_POLICIES, default="replace",
                        help="input that is not valid UTF-8 (or a lone surrogate escape): replace each offending "
                             "sequence by U+FFFD, or skip its document; counted and reported either way")
    parser.set_defaults(func=run_prepare_data)
    return parser


def run_prepare_data(args) -> int:
    try:
        tokenizer_path = resolve_tokenizer(args.tokenizer, os.path.abspath(args.cache_dir), args.vocab_size)
        manifest = prepare_dataset(args.inputs, args.out, tokenizer_path, workers=args.workers,
                                   shard_docs=args.shard_docs, shard_tokens=args.shard_tokens,
                                   text_field=args.text_field, progress=True,
                                   on_decode_error=args.on_decode_error)
    except (ValueError, FileNotFoundError) as error:
        print(f"prepare-data: error: {error}", file=sys.stderr)
        return 2
    documents = sum(s.nsamples for s in manifest.shards)
    tokens = sum(s.tokens for s in manifest.shards)
    print(f"prepare-data: {len(manifest.shards)} shards, {documents} documents, {tokens} tokens in {args.out}")
    return 0


def ensure_builtin_corpus(cache_dir: str, vocab_size: int, tokenizer: str = BUILTIN_TOKENIZER,
                          heldout: bool = False) -> tuple[str, str]:
    """(shard_dir, tokenizer_path) of the builtin corpus tokenized with ``tokenizer`` ('builtin' or a path); with
    ``heldout``, of the held-out files that follow it (``builtin:stdlib-heldout``, for validation)."""
    tokenizer_path = ensure_builtin_tokenizer(cache_dir, vocab_size) if tokenizer == BUILTIN_TOKENIZER else tokenizer
    tag = f"{CORPUS_TAG}-heldout{HELDOUT_BYTES >> 10}k" if heldout else CORPUS_TAG
    files = stdlib_source_files(HELDOUT_BYTES, skip_bytes=CORPUS_BYTES) if heldout else stdlib_source_files()
    shard_dir = os.path.join(cache_dir, "corpora", f"{tag}-{file_sha256(tokenizer_path)[:12]}")
    with file_lock(os.path.join(cache_dir, "builtin.lock")):
        if not os.path.exists(os.path.join(shard_dir, MANIFEST_NAME)):
            prepare_dataset(files, shard_dir, tokenizer_path, workers=min(2, os.cpu_count() or 1),
                            shard_docs=SHARD_DOCUMENTS, progress=sys.stderr.isatty())
    return shard_dir, tokenizer_path

"""Shards in an S3-compatible object store: a real local S3 server (moto's server mode, an HTTP process the test
starts) read through fsspec + s3fs, never a mock of the client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from data_pipeline import DataConfig, DataWarning, GlobalSampleStream, SourceConfig
from data_pipeline.remote import ShardUnavailable, read_remote
from tests.data_helpers import write_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "corpus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("the local S3 server (moto) exited at start-up")
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the local S3 server (moto) did not start within 60 s")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(s3fs filesystem, environment) of a local S3 server with an empty bucket."""
    import s3fs

    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # for the training processes (fsspec reads FSSPEC_S3_* when it is imported)
    fsspec.config.conf["s3"] = {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}  # for this process
    server = start_server(port)
    try:
        fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
        fs.mkdir(BUCKET)
        yield fs, env
    finally:
        fsspec.config.conf.pop("s3", None)
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(fs, local_dir, prefix) -> str:
    for name in sorted(os.listdir(local_dir)):
        fs.put_file(os.path.join(local_dir, name), f"{BUCKET}/{prefix}/{name}")
    return f"s3://{BUCKET}/{prefix}"


def train_digests(tmp_path, name, data_path, env):
    """batch digests of a 3-step single-process run of the tiny model on one data source."""
    run_dir = tmp_path / name
    command = [sys.executable, "-m", "mimo_train.launch.cli", "train", "--config", "configs/train/tiny_cpu.yaml",
               "train.steps=3", "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
               "run.wandb_mode=disabled", f"run.dir={run_dir}", "model.vocab_size=4096",
               f"data.sources=[{{name: docs, path: '{data_path}', weight: 1.0}}]", "data.shuffle_group_shards=4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["batch_digest"] for r in records]


def test_training_from_s3_gives_the_batches_of_local_shards(s3, tmp_path):
    fs, env = s3
    local = tmp_path / "local"
    write_source(local, shards=6, docs_per_shard=12, first_token=1, max_len=60)
    url = upload(fs, local, "train")
    # the remote copies land in the run's cache (under run.dir), not in the working directory
    env = {**env, "MIMO_TRAIN_CACHE": ""}
    assert train_digests(tmp_path, "s3", url, env) == train_digests(tmp_path, "local", local, env)
    # 3 steps of 4 x 64 tokens stay in the epoch's first group of 4 shards: only those were fetched
    assert len(os.listdir(tmp_path / "s3" / "cache" / "remote-shards")) == 4


def test_missing_and_corrupt_objects_are_skipped_like_bad_shards(s3, tmp_path):
    fs, _ = s3
    local = tmp_path / "local"
    write_source(local, shards=4, docs_per_shard=5, first_token=1)
    url = upload(fs, local, "damaged")
    fs.rm(f"{BUCKET}/damaged/shard-000001.tar")
    data = bytearray((local / "shard-000002.tar").read_bytes())
    data[700:716] = b"\xff" * 16
    fs.pipe_file(f"{BUCKET}/damaged/shard-000002.tar", bytes(data))
    config = DataConfig(sources=[SourceConfig("s3", url)], cache_dir=str(tmp_path / "cache"), num_workers=1)
    stream = GlobalSampleStream(config)
    stream.set_stage(16)
    with pytest.warns(DataWarning) as caught:
        for step in range(12):  # more than one epoch: every shard is opened (by the prefetch worker)
            stream.micro_batches(step, 8, 4)
    messages = " ".join(str(w.message) for w in caught)
    assert "shard-000001.tar: missing" in messages and "shard-000002.tar: sha256 mismatch" in messages
    assert stream.stats()["data/skipped_shards"] == 2
    stream.close()


def test_transient_failures_are_retried_and_persistent_ones_give_up(s3, tmp_path, monkeypatch):
    fs, env = s3
    fs.pipe_file(f"{BUCKET}/retry/blob", b"payload")
    # A second server, not yet started: the first attempts fail (connection refused), the server comes up, the
    # read succeeds within the retry budget.
    # The client's own retries are turned off, so the retries seen here are the data pipeline's.
    no_client_retries = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    # A persistent failure (an endpoint where nothing listens) gives up after the attempts, promptly.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                   **no_client_retries})
    start = time.time()
    with pytest.raises(ShardUnavailable, match="unreadable after 3 attempts"):
        read_remote(f"s3://{BUCKET}/retry/blob", attempts=3, first_backoff_s=0.05)
    assert time.time() - start < 60
    # A transient one: the endpoint is a forwarder to the server that starts listening only after a while, so
    # the first attempts are refused; the reader backs off, retries and gets the object.
    port, upstream = free_port(), int(env["FSSPEC_S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}", **no_client_retries})
    forwarder = threading.Timer(1.0, forward, (port, upstream))
    forwarder.daemon = True
    forwarder.start()
    assert read_remote(f"s3://{BUCKET}/retry/blob", attempts=6, first_backoff_s=0.3) == b"payload"


def forward(port: int, upstream: int) -> None:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:upstream (daemon threads, for the life of the test process)."""
    listener = socket.create_server(("127.0.0.1", port))

    def pipe(source, sink):
        with source, sink:
            while data := source.recv(65536):
                sink.sendall(data)

    while True:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", upstream))
        threading.Thread(target=pipe, args=(client, server.dup()), daemon=True).start()
        threading.Thread(target=pipe, args=(server, client.dup()), daemon=True).start()

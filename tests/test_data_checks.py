"""Bad data settings are one-line config errors (exit 2) from `mimo-train train`, before any model is built."""

from __future__ import annotations

import pytest

from mimo_train.launch import cli
from tests.data_helpers import write_source

BASE = ["train", "--config", "configs/train/tiny_cpu.yaml", "train.steps=1", "run.wandb_mode=disabled"]


@pytest.fixture
def train(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr("mimo_train.training.trainer.Trainer._build", lambda self, stage: built.append(stage))

    def run(*overrides):
        code = cli.main([*BASE, f"run.dir={tmp_path / 'run'}", *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2 and not built, (code, err)  # refused before the model (and the stream) were built
        assert len(err.splitlines()) == 1, err
        return err

    return run


def test_a_data_source_without_a_path(train):
    assert "data.sources[0].path: every data source needs a path" in train("data.sources=[{name: web}]")


def test_a_missing_data_directory_or_manifest(train, tmp_path):
    assert "data.sources[0].path: no such directory" in train(f"data.sources=[{{name: web, path: {tmp_path}/no}}]")
    (tmp_path / "empty").mkdir()
    err = train(f"data.sources=[{{name: web, path: {tmp_path}/empty}}]")
    assert "has no manifest.json; run `mimo-train prepare-data" in err


def test_a_missing_tokenizer_file(train, tmp_path):
    assert "data.tokenizer: no such file" in train(f"data.tokenizer={tmp_path}/tokenizer.json")


def test_token_ids_at_or_above_the_model_vocabulary(train, tmp_path):
    # the manifest records the vocabulary its ids come from (here: 1 + the largest id, about 10_100)
    write_source(tmp_path / "src", shards=1, docs_per_shard=3, first_token=10_000)
    err = train(f"data.sources=[{{name: web, path: {tmp_path}/src}}]", "model.vocab_size=4096")
    assert "model.vocab_size: 4096 is too small for data source 'web', whose token ids go up to 10" in err

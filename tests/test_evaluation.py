"""Validation on held-out sources: LM and MTP losses per source in metrics.jsonl (and wandb, which logs every
numeric field of a record), the same every time, equal to a direct computation; MTP acceptance and the expected
accepted draft length equal a position-by-position count. Identity across layouts (single vs DP2 under the
launcher) is checked in tests/test_faults.py, in the launch it already does."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mimo_train.config import ConfigError, load_config
from mimo_train.training.evaluation import Evaluator
from mimo_train.training.trainer import Trainer
from tests.data_helpers import write_source
from tests.scripts.staged import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def held_out_source(directory) -> str:
    """A prepared source of unique-token documents (ids below the tiny model's vocabulary)."""
    write_source(directory, shards=2, docs_per_shard=12, first_token=5, seed=9, min_len=20, max_len=90)
    return f"[{{name: held, path: {directory}}}]"


def eval_overrides(tmp_path, *extra) -> list[str]:
    return ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
            "run.wandb_mode=disabled", "data.num_workers=0", "train.eval_interval=2", "train.eval_samples=4",
            "model.mtp.num_blocks=2", f"data.eval_sources={held_out_source(tmp_path / 'held')}", *extra]


def test_validation_losses_and_mtp_acceptance(tmp_path):
    cfg = load_config("configs/train/tiny_cpu.yaml", [*eval_overrides(tmp_path), "train.steps=2",
                                                      f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, resume="none")
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/held/lm_loss" not in lines[0]
    logged = {k: v for k, v in lines[1].items() if k.startswith("eval/")}
    assert set(logged) == {f"eval/held/{k}" for k in ("lm_loss", "mtp_loss_depth1", "mtp_loss_depth2",
                                                      "mtp_acceptance_depth1", "mtp_acceptance_depth2",
                                                      "accepted_length_k1", "accepted_length_k2")}
    evaluator = Evaluator(cfg, trainer.model, trainer.topo)
    again = evaluator.evaluate(trainer.stage)
    assert again == logged  # the same sequences, the same numbers, every time

    # A direct computation over the same four sequences: whole-batch means, and position-by-position acceptance.
    stream = evaluator._stream(cfg.data.eval_sources[0], trainer.stage)
    batch = stream.micro_batches(0, 4, 4)[0]
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    labels, positions = batch["labels"], batch["position_ids"]
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    assert logged["eval/held/lm_loss"] == pytest.approx(lm.item(), rel=1e-6)
    main = out.logits.argmax(-1)
    accepted, positions_counted, run_total = [0, 0], 0, [0, 0]
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            def same_doc(j):
                return j < labels.shape[1] and all(positions[b, k] != 0 for k in range(i + 1, j + 1))
            if not (same_doc(i + 1) and labels[b, i + 1] != -100):
                continue
            positions_counted += 1
            run = True
            for d in (1, 2):
                ok = same_doc(i + d) and labels[b, i + d] != -100 and \
                    out.mtp_logits[d - 1][b, i].argmax() == main[b, i + d]
                accepted[d - 1] += int(ok)
                run = run and bool(ok)
                run_total[d - 1] += int(run)
    assert positions_counted > 100
    for d in (1, 2):
        assert logged[f"eval/held/mtp_acceptance_depth{d}"] == pytest.approx(accepted[d - 1] / positions_counted)
    assert logged["eval/held/accepted_length_k1"] == pytest.approx(1 + run_total[0] / positions_counted)
    assert logged["eval/held/accepted_length_k2"] == pytest.approx(1 + (run_total[0] + run_total[1]) / positions_counted)

    with pytest.raises(ConfigError, match="train.eval_samples: must be a multiple of micro_batch_size x parallel.dp"):
        Evaluator(cfg, trainer.model, trainer.topo).evaluate(
            type(trainer.stage)(**{**trainer.stage.__dict__, "micro_batch_size": 3}))

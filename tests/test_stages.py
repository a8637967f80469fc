"""The staged schedule: the MiMo-V2-Flash recipe as a config, the batch ramp-up (megatron-core's calculator), the
per-stage learning rate, and a staged run that switches sequence length, batch, RoPE base and loss weights at a
token boundary, checkpoints there, and neither repeats nor skips a token of the data stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.stream import GlobalSampleStream
from mimo_train.training import checkpoint as ckpt
from mimo_train.config import ConfigError, load_config
from mimo_train.training.stages import BatchSchedule, StagePlan, StageStart, rampup_batch_size
from mimo_train.training.trainer import Trainer
from tests.scripts.staged import BASE_CONFIG, write_config, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


RECIPE = "configs/train/mimo_v2_flash_pretrain.yaml"
T, B = 10**12, 10**9


def test_recipe_config_is_the_spec():
    cfg = load_config(RECIPE)
    plan = StagePlan(cfg)
    s1, s2, s3 = plan.stages
    assert [s.name for s in plan.stages] == ["pretrain", "midtrain", "long_context"]
    assert [s.end_tokens for s in plan.stages] == [22 * T, 26 * T, 27 * T]
    assert [s.seq_len for s in plan.stages] == [32768, 32768, 262144]
    assert [s.global_batch_size for s in plan.stages] == [2048, 2048, 256]
    assert [s.mtp_loss_weight for s in plan.stages] == [0.3, 0.1, 0.1]
    assert [s.expert_bias_update_rate for s in plan.stages] == [1e-3, 1e-3, 1e-5]
    assert [s.aux_loss_coeff for s in plan.stages] == [1e-5] * 3
    assert [s.rope_theta for s in plan.stages] == [640_000, 640_000, 5_000_000]
    assert s1.seq_len * s1.global_batch_size == s3.seq_len * s3.global_batch_size == 2**26  # tokens per step
    # More context parallelism at 256k on the same number of GPUs.
    assert s3.parallel.cp > s1.parallel.cp and s3.parallel.world_size == s1.parallel.world_size == 1024

    def lr(stage, tokens_in):
        start = StageStart(stage.index, 0, 0 if stage.index == 0 else plan.stages[stage.index - 1].end_tokens, 0)
        return plan.learning_rate(stage, start, 0, start.tokens + tokens_in)

    assert lr(s1, 25 * B) == pytest.approx(1.6e-4)  # half-way through the 50B-token warm-up
    assert lr(s1, 50 * B) == pytest.approx(3.2e-4) and lr(s1, 6 * T) == pytest.approx(3.2e-4)
    assert lr(s1, 22 * T) == pytest.approx(1.0e-4)  # cosine to 1e-4 at 22T
    assert lr(s2, 1) == pytest.approx(1.0e-4) and lr(s2, 4 * T) == pytest.approx(3.0e-5)
    assert lr(s3, 1) == pytest.approx(3.0e-5) and lr(s3, 1 * T) == pytest.approx(1.0e-5)
    # Batch ramp-up: megatron-core's calculator, over the first 500B tokens.
    ramp_samples = 500 * B // 32768
    calculator = _megatron_rampup(s1)
    ours = BatchSchedule(s1, s1.parallel.dp)
    for samples in [0, 1, ramp_samples // 3, ramp_samples // 2, ramp_samples - 1, ramp_samples, ramp_samples + 1]:
        calculator.update(samples, consistency_check=True)
        assert ours.global_batch_size(samples) == calculator.get_current_global_batch_size(), samples
        assert rampup_batch_size(s1, samples) == ours.global_batch_size(samples)
    assert ours.global_batch_size(0) == 256 and ours.global_batch_size(ramp_samples + 1) == 2048
    assert 400_000 < plan.planned_steps() < 420_000


def _megatron_rampup(stage):
    """The reference: megatron-core's ramp-up calculator for `stage`."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    start, increment, samples = stage.rampup
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=stage.global_batch_size, micro_batch_size=stage.micro_batch_size,
        data_parallel_size=stage.parallel.dp, decrease_batch_size_if_needed=False, rank=0,
        start_global_batch_size=start, batch_size_increment=increment, ramup_samples=samples)


@pytest.mark.parametrize("override, message", [
    ("train.stages=[{end_tokens: 100}, {end_tokens: 50}]", "train.stages[1].end_tokens: must be greater"),
    ("train.stages=[{end_tokens: 1T, parallel: {xp: 2}}]", "train.stages[0].parallel.xp: unknown key"),
    ("train.stages=[{end_tokens: 1T, rampup: {start: 3, increment: 2, tokens: 1B}}]", "train.stages[0].rampup"),
    ("train.stages=[{end_tokens: lots}]", "train.stages[0].end_tokens: must be a token count"),
])
def test_stage_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(BASE_CONFIG, [override])


def test_staged_run_switches_at_the_boundary_without_repeating_or_skipping_data(tmp_path, monkeypatch):
    served = []
    original = GlobalSampleStream.micro_batches

    def recording(self, step, global_batch_size, micro_batch_size, **kwargs):
        batches = original(self, step, global_batch_size, micro_batch_size, **kwargs)
        served.append((step, torch.cat([b["input_ids"] for b in batches])))
        return batches

    monkeypatch.setattr(GlobalSampleStream, "micro_batches", recording)
    config = write_config(tmp_path, save_interval=0)
    trainer = Trainer(load_config(config, [f"run.dir={tmp_path / 'run'}"]), resume="none")
    records = trainer.fit()

    assert [r["stage"] for r in records] == ["a"] * 7 + ["b"] * 4
    assert [r["seq_len"] for r in records] == [64] * 7 + [128] * 4
    assert [r["global_batch_size"] for r in records] == [2, 2, 4, 4, 4, 4, 4, 2, 2, 2, 2]  # ramp-up 2 -> 4
    assert records[6]["tokens"] == 1536 and records[-1]["tokens"] == 2560
    for r, weight in zip(records, [0.3] * 7 + [0.1] * 4):  # the MTP weight of each stage
        assert r["loss"] == pytest.approx(r["lm_loss"] + weight * r["mtp_loss"] + r["aux_loss"], rel=1e-12)
    # The stage's LR schedule restarts: stage b's cosine from 1e-3 to 3e-4 over its 1,024 tokens.
    assert records[7]["lr"] == pytest.approx(3e-4 + 0.5 * 7e-4 * (1 + np.cos(np.pi * 256 / 1024)))
    assert records[-1]["lr"] == pytest.approx(3e-4)
    assert trainer.model.cfg.rope_theta == 5_000_000.0  # the GA RoPE base of stage b
    # The boundary checkpoint (kept by retention) and the final one.
    boundary = ckpt.read_meta(tmp_path / "run/checkpoints" / ckpt.checkpoint_name(7))
    assert boundary["stage_boundary"] and boundary["trainer"]["stage_name"] == "b"
    assert boundary["data"]["seq_len"] == 128 and boundary["data"]["stage_start_sample"] == 24
    assert ckpt.find_latest(tmp_path / "run/checkpoints").name == ckpt.checkpoint_name(11)

    # Every token of the source is an input exactly once, in order, across the switch from 64 to 128 tokens.
    assert [s for s, _ in served] == list(range(11))
    inputs = np.concatenate([x.reshape(-1).numpy() for _, x in served])
    stream = trainer.data.sources[0].read(0, len(inputs))
    assert len(inputs) == 2560 and np.array_equal(inputs, stream)
    lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 12))

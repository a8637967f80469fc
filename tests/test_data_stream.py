"""The global sample stream: DP-invariant global batches, exact resume, stage changes, random access."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import GlobalSampleStream, digest_token_windows
from data_pipeline.mixture import MixtureSchedule
from data_pipeline.packing import IGNORE_INDEX, windows_to_batch
from tests.data_helpers import EOS, source_of, two_source_config

SEQ_LEN = 16


def make_streams(config, dp_size, seq_len=SEQ_LEN, weights=None):
    streams = [GlobalSampleStream(config, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for stream in streams:
        stream.set_stage(seq_len, weights)
    return streams


def global_step(streams, step, global_batch_size, micro_batch_size=1):
    """The global batch of a step as all ranks deliver it: their micro-batches concatenated in rank order."""
    per_rank = [torch.cat([mb["input_ids"] for mb in s.micro_batches(step, global_batch_size, micro_batch_size)])
                for s in streams]
    return torch.cat(per_rank)


def test_global_batches_are_identical_for_dp_1_2_4_with_batch_ramp(tmp_path):
    config = two_source_config(tmp_path, weights=(2.0, 1.0))
    ramp = [4, 4, 8, 8, 16, 16, 16]  # global batch size per step, as Megatron's ramp-up would change it
    reference = None
    for dp_size in (1, 2, 4):
        streams = make_streams(config, dp_size)
        batches, digests = [], []
        for step, gbs in enumerate(ramp):
            digest = streams[0].global_batch_digest(step, gbs)
            assert all(s.global_batch_digest(step, gbs) == digest for s in streams)
            gathered = torch.cat([s.local_token_windows(step, gbs) for s in streams])  # what an all-gather yields
            assert digest_token_windows(gathered) == digest
            batches.append(global_step(streams, step, gbs, micro_batch_size=gbs // dp_size // 2 or 1))
            assert torch.equal(batches[-1], gathered[:, :-1].long())
            digests.append(digest)
        if reference is None:
            reference = (batches, digests)
            assert len(set(digests)) == len(digests)  # every step gets new data
        else:
            assert digests == reference[1]
            assert all(torch.equal(x, y) for x, y in zip(batches, reference[0]))


def test_micro_batch_contents(tmp_path):
    config = two_source_config(tmp_path)
    (stream,) = make_streams(config, 1)
    micro_batches = stream.micro_batches(0, global_batch_size=8, micro_batch_size=4)
    assert len(micro_batches) == 2
    windows = stream.local_token_windows(0, 8).numpy()
    for m, batch in enumerate(micro_batches):
        assert set(batch) == {"input_ids", "labels", "position_ids", "max_documents"}
        assert all(batch[k].dtype == torch.int64 and batch[k].shape == (4, SEQ_LEN)
                   for k in ("input_ids", "labels", "position_ids"))
        rows = windows[4 * m : 4 * m + 4]
        # the host-side bound on document ids (for the attention kernels' tables) holds and is tight
        docs = torch.cumsum((batch["position_ids"] == 0).int(), dim=1)
        assert int(docs.max()) < batch["max_documents"] <= int(docs.max()) + 1
        np.testing.assert_array_equal(batch["input_ids"].numpy(), rows[:, :-1])
        expected_labels = np.where(rows[:, :-1] == EOS, IGNORE_INDEX, rows[:, 1:])
        np.testing.assert_array_equal(batch["labels"].numpy(), expected_labels)
    # asking again for the step just served is idempotent; skipping a step is refused
    again = stream.micro_batches(0, 8, 4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, micro_batches))
    with pytest.raises(ValueError, match="step 5"):
        stream.micro_batches(5, 8, 4)


def test_packing_position_ids_restart_at_each_document():
    eos = 0
    window = np.array([[7, 8, 0, 5, 6, 9, 0, 4, 3]])  # seq_len 8 (+1 for the last label)
    batch = windows_to_batch(window, np.array([eos]))
    assert batch["input_ids"].tolist() == [[7, 8, 0, 5, 6, 9, 0, 4]]
    assert batch["labels"].tolist() == [[8, 0, IGNORE_INDEX, 6, 9, 0, IGNORE_INDEX, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


@pytest.mark.parametrize("resume_dp_size", [1, 4])
def test_resume_mid_epoch_yields_exactly_the_uninterrupted_samples(tmp_path, resume_dp_size):
    """A loader with prefetching workers, stopped mid-epoch and resumed (also with another DP size),
    yields exactly what an uninterrupted loader yields."""
    config = two_source_config(tmp_path, num_workers=2)
    steps, gbs = 10, 8
    uninterrupted = make_streams(config, 2)
    expected = [global_step(uninterrupted, step, gbs, 2) for step in range(steps)]

    first_run = make_streams(config, 2)
    for step in range(4):
        assert torch.equal(global_step(first_run, step, gbs, 2), expected[step])
    states = [s.state_dict() for s in first_run]
    assert states[0] == states[1]  # the state is global: nothing per rank
    state = json.loads(json.dumps(states[0]))  # it is a few plain numbers
    assert state["consumed_samples"] == 4 * gbs
    epoch_windows = min(s.epoch_length for s in first_run[0].sources) // SEQ_LEN
    assert state["consumed_samples"] < epoch_windows  # we really stopped mid-epoch

    resumed = make_streams(config, resume_dp_size)
    for stream in resumed:
        stream.load_state_dict(state)
        stream.set_stage(SEQ_LEN)  # a resumed trainer repeats its stage setup: a no-op
    for step in range(4, steps):
        assert torch.equal(global_step(resumed, step, gbs, 2 if resume_dp_size == 1 else 1), expected[step])
    for stream in uninterrupted + first_run + resumed:
        stream.close()


def test_stage_change_consumes_every_token_exactly_once(tmp_path):
    """Stage 1 (seq_len 16, weights 1:1), then stage 2 (seq_len 24, weights 3:1), resumed half-way with another
    DP size: per source, the windows tile its token stream with no gap and no repeat, across the boundary; the
    document cut by the boundary continues in the source's first window of the new stage."""
    config = two_source_config(tmp_path)
    gbs = 8
    windows_by_source: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    stage_of_window: dict[str, list[int]] = {"a": [], "b": []}

    def run(streams, steps, stage):
        for step in steps:
            windows = torch.cat([s.local_token_windows(step, gbs) for s in streams]).numpy()
            for s in streams:
                s.micro_batches(step, gbs, 1)
            for window in windows:
                windows_by_source[source_of(window)].append(window)
                stage_of_window[source_of(window)].append(stage)

    streams = make_streams(config, 2, seq_len=16, weights={"a": 1.0, "b": 1.0})
    run(streams, range(0, 5), stage=1)
    for s in streams:
        s.set_stage(24, {"a": 3.0, "b": 1.0})  # the stage boundary
    run(streams, range(5, 8), stage=2)
    state = streams[0].state_dict()
    streams = make_streams(config, 4, seq_len=16)
    for s in streams:
        s.load_state_dict(state)
    run(streams, range(8, 12), stage=2)

    stage2 = [w for stages in stage_of_window.values() for w in stages if w == 2]
    assert len(stage2) == 7 * gbs
    assert sum(1 for w in stage_of_window["a"] if w == 2) == pytest.approx(0.75 * 7 * gbs, abs=2)

    for name, windows in windows_by_source.items():
        # consecutive windows of a source overlap by exactly one token (the last label is the next first input)
        for previous, current in zip(windows, windows[1:]):
            assert previous[-1] == current[0]
        inputs = np.concatenate([w[:-1] for w in windows])
        tokens = inputs[inputs != EOS]
        assert len(np.unique(tokens)) == len(tokens), f"source {name}: a token was consumed twice"
        # documents are runs of consecutive ids: the stream is whole documents, except the last, partly consumed one
        documents = np.split(inputs, np.flatnonzero(inputs == EOS) + 1)
        assert all(np.all(np.diff(d[d != EOS]) == 1) for d in documents)
        assert all(d[-1] == EOS for d in documents[:-1])
        # the boundary cut the stage-1 windows of the source; stage 2 begins where they stopped
        last_stage1 = max(i for i, st in enumerate(stage_of_window[name]) if st == 1)
        assert windows[last_stage1][-1] == windows[last_stage1 + 1][0]
        assert len(windows[last_stage1]) == 17 and len(windows[last_stage1 + 1]) == 25


def test_seeking_far_ahead_reads_only_the_needed_documents(tmp_path):
    config = two_source_config(tmp_path)
    (stream,) = make_streams(config, 1)
    state = stream.state_dict()
    state.update(consumed_samples=50_000, next_step=6_250)  # many epochs ahead, without reading anything
    stream.load_state_dict(state)
    assert stream.stats()["data/document_reads"] == 0  # seeking itself reads nothing
    windows = stream.local_token_windows(6_250, 8).numpy()
    stream.micro_batches(6_250, 8, 8)
    stats = stream.stats()
    # a window needs one document piece, plus one per document boundary inside it: nothing else was read
    pieces = sum(1 + int(np.sum(w[:-1] == EOS)) for w in windows)
    assert 0 < stats["data/document_reads"] <= 2 * pieces  # windows are read once for the check, once for the step
    assert stats["data/shard_opens"] <= 2 * len(windows)
    assert stats["data/consumed_samples"] == 50_008


def test_epochs_reshuffle_and_cover_every_token_once(tmp_path):
    config = two_source_config(tmp_path, shards=3, docs_per_shard=5)
    (stream,) = make_streams(config, 1)
    source = stream.sources[0]
    epoch = source.read(0, 2 * source.epoch_length)
    first, second = epoch[: source.epoch_length], epoch[source.epoch_length :]
    for tokens in (first, second):
        body = np.sort(tokens[tokens != EOS])
        np.testing.assert_array_equal(body, np.arange(1, len(body) + 1))  # every token of the source, once
    assert not np.array_equal(first, second)  # a new epoch visits the documents in a new order


def test_mixture_schedule_is_proportional_and_consistent():
    schedule = MixtureSchedule([5.0, 3.0, 0.5], seed_keys=(1, 2))
    fractions = np.array([5.0, 3.0, 0.5]) / 8.5
    n = 3 * schedule.block_size + 123
    sources, ordinals = schedule.locate(np.arange(n))
    for k in (1, 17, schedule.block_size, n):
        counts = np.bincount(sources[:k], minlength=3)
        np.testing.assert_array_equal(counts, schedule.prefix_counts(k))
        if k % schedule.block_size == 0:
            assert np.all(np.abs(counts - k * fractions) < 1)
    for s in range(3):  # each source's samples are numbered 0, 1, 2, ... in stage order
        np.testing.assert_array_equal(ordinals[sources == s], np.arange(np.sum(sources == s)))
    again = MixtureSchedule([5.0, 3.0, 0.5], seed_keys=(1, 2)).locate(np.arange(n - 50, n))
    np.testing.assert_array_equal(again[0], sources[-50:])  # random access agrees with a sequential pass


def test_mixture_proportions_hold_in_every_stretch_of_samples():
    schedule = MixtureSchedule([3.0, 1.0], seed_keys=(3, 0))
    sources, _ = schedule.locate(np.arange(4 * schedule.block_size))
    for start in range(0, len(sources) - 64, 37):  # any 64 consecutive samples, across block boundaries too
        assert abs(np.sum(sources[start : start + 64] == 0) - 48) <= 2

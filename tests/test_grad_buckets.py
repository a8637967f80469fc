"""The launch order of overlapped gradient reduction (parallel/grad_buckets.py): buckets of a group go in their
fixed order whatever order their gradients arrive in, a bucket waits for every gradient of the step, and what
never becomes ready is launched at the end. (Numbers: tests/test_precision.py and tests/test_parallel.py.)"""

from __future__ import annotations

import pytest

from parallel.grad_buckets import BucketSchedule, split_into_buckets


def _schedule(groups, deferred=frozenset()):
    launched = []
    return BucketSchedule(groups, lambda g, b: launched.append((g, b)), deferred), launched


def test_buckets_hold_consecutive_tensors_up_to_the_size():
    nbytes = {"a": 3, "b": 3, "c": 5, "d": 1, "e": 1}
    assert split_into_buckets(list(nbytes), nbytes, 6) == [["a", "b"], ["c", "d"], ["e"]]
    assert split_into_buckets(["c"], {"c": 50}, 6) == [["c"]]  # larger than a bucket: alone


def test_a_ready_bucket_waits_for_the_earlier_buckets_of_its_group():
    schedule, launched = _schedule([[["a"], ["b"]], [["x"]]])
    schedule.expect({"a": 2, "b": 2, "x": 2})
    for name in ("b", "x", "b"):
        schedule.accumulated(name)
    assert launched == []  # b has all its gradients, x not yet; b waits for a
    schedule.accumulated("x")
    assert launched == [(1, 0)]  # another group goes on its own
    schedule.accumulated("a")
    assert launched == [(1, 0)]  # a has one of two gradients
    schedule.accumulated("a")
    assert launched == [(1, 0), (0, 0), (0, 1)]
    schedule.launch_remaining()
    assert launched == [(1, 0), (0, 0), (0, 1)] and schedule.launched_early == 3


def test_parameters_short_of_gradients_or_deferred_are_launched_at_the_end_in_order():
    schedule, launched = _schedule([[["a", "tied"], ["b"], ["c"]]], deferred={"tied"})
    schedule.expect({"a": 1, "tied": 1, "b": 2, "c": 1})
    for name in ("c", "b", "a", "tied"):  # b gets one of its two (an expert without tokens in a micro-batch)
        schedule.accumulated(name)
    assert launched == []  # bucket 0 holds the deferred tied embedding
    schedule.launch_remaining()
    assert launched == [(0, 0), (0, 1), (0, 2)]
    schedule.accumulated("c")  # after the step: not armed, ignored
    assert launched == [(0, 0), (0, 1), (0, 2)]
    schedule.launch_remaining()  # the next step, not armed (no overlap): every bucket again, in order
    assert launched == [(0, 0), (0, 1), (0, 2)] * 2


def test_a_gradient_after_its_bucket_was_launched_is_an_error():
    schedule, launched = _schedule([[["a"]]])
    schedule.expect({"a": 1})
    schedule.accumulated("a")
    assert launched == [(0, 0)]
    with pytest.raises(RuntimeError, match="a received 2 gradients in one step, more than the 1 expected"):
        schedule.accumulated("a")

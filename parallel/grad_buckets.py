"""When each bucket of gradients may be reduced: the scheduling half of overlapped gradient reduction (Megatron-Core's
--overlap-grad-reduce); `parallel/data_parallel.py` does the collectives.

The parameters of each gradient group are cut into buckets of about `parallel.grad_bucket_mb` in reverse parameter
order (the order in which the backward produces their gradients: head first, embedding last). A hook on every
parameter (`register_post_accumulate_grad_hook`, run after the fp32 main-gradient fold) counts the gradients the
parameter has received this step; a bucket is ready when each of its parameters has received as many as the step
will give it: one per micro-batch and per local pipeline stage that uses it (`expect`). A bucket is launched as soon
as it is ready and every earlier bucket of its group has been launched, so every rank launches the buckets of a
group in the same fixed order, whatever order its hooks fire in. Whatever is not launched by the end of the backward
is launched then, in the same order (`launch_remaining`). That covers, without early launches, every parameter whose
count falls short:

- one that receives no gradient in some micro-batch (experts that got no tokens; `fill_missing_gradients` gives it
  zeros afterwards);
- weight gradients computed outside autograd's accumulation (the zero-bubble schedules' separate weight pass adds
  them into `.grad` by hand, firing no hook);
- parameters marked `deferred` (the pipeline's tied embedding, whose copies are first summed over the tied group).

A parameter that has received all its gradients can receive no more in the step, so a launched bucket is final.
"""

from __future__ import annotations

from typing import Callable


def split_into_buckets(names: list[str], nbytes: dict[str, int], bucket_bytes: float) -> list[list[str]]:
    """`names` in order, cut into consecutive buckets of at most `bucket_bytes` (a larger tensor is a bucket alone)."""
    buckets: list[list[str]] = []
    size = 0.0
    for n in names:
        if not buckets or size + nbytes[n] > bucket_bytes:
            buckets.append([])
            size = 0.0
        buckets[-1].append(n)
        size += nbytes[n]
    return buckets


class BucketSchedule:
    """Launches each group's buckets in their fixed order as their parameters receive their last gradient.

    `groups[g]` is group g's list of buckets (lists of parameter names) in launch order; `launch(g, b)` starts the
    collective of bucket b of group g."""

    def __init__(self, groups: list[list[list[str]]], launch: Callable[[int, int], None],
                 deferred: set[str] = frozenset()):
        self.groups = groups
        self._launch = launch
        self.deferred = set(deferred)
        self.where = {n: (g, b) for g, buckets in enumerate(groups) for b, names in enumerate(buckets) for n in names}
        self.next = [0] * len(groups)  # per group: the first bucket not launched yet
        self.expected: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.missing: list[list[int]] = []  # per group and bucket: parameters still waiting for gradients
        self.armed = False
        self.launched_early = 0  # buckets launched while the backward ran, in the last step

    def expect(self, gradients: dict[str, int]) -> None:
        """Arm for one step: parameter name -> number of gradient accumulations it will receive (absent: none)."""
        self.expected = {n: k for n, k in gradients.items() if n in self.where and n not in self.deferred and k > 0}
        self.received = dict.fromkeys(self.where, 0)
        self.missing = [[sum(n in self.expected for n in names) if all(n in self.expected for n in names) else -1
                         for names in buckets] for buckets in self.groups]
        self.next = [0] * len(self.groups)
        self.launched_early = 0
        self.armed = True

    def accumulated(self, name: str) -> None:
        """A hook: `name` has received one more gradient."""
        if not self.armed or name not in self.expected:
            return
        self.received[name] += 1
        if self.received[name] > self.expected[name]:  # its bucket was reduced without this gradient
            raise RuntimeError(f"{name} received {self.received[name]} gradients in one step, more than the "
                               f"{self.expected[name]} expected (one per micro-batch and local stage using it)")
        if self.received[name] != self.expected[name]:
            return
        g, b = self.where[name]
        self.missing[g][b] -= 1
        while self.next[g] < len(self.groups[g]) and self.missing[g][self.next[g]] == 0:
            self._launch(g, self.next[g])
            self.next[g] += 1
            self.launched_early += 1

    def launch_remaining(self) -> None:
        """Launch every bucket not launched yet, in order; disarm until the next step's `expect`."""
        for g, buckets in enumerate(self.groups):
            for b in range(self.next[g], len(buckets)):
                self._launch(g, b)
        self.next = [0] * len(self.groups)
        self.armed = False

"""`mimo-train submit` against a real Slurm (Debian's slurm-wlm 22.05 + munge, started here by a fixture):

- one node, 2 tasks (DP2 on gloo), and two fake nodes x 1 task: the job is sent USR1 mid-run (the path Slurm takes
  `--signal` lead time before the time limit), checkpoints, requeues itself, resumes from that checkpoint and ends
  with metrics equal to an uninterrupted run's (2 ranks, `mimo-train train --nproc 2`, no Slurm);
- a task killed with SIGKILL ends the job with an error and no requeue, the newest complete checkpoint stays
  intact, and a resubmission resumes from it and again ends equal to the uninterrupted run.

The daemons (munged if none answers, slurmctld, slurmd per node) are started per cluster and stopped by PID at
the end, also on failure (tests/scripts/slurm_cluster.py). Under CI (CI=true) nothing here skips: a missing
binary or a daemon that does not start fails with the daemon logs. Elsewhere the cluster tests skip only when
the Slurm binaries are absent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MISSING = missing_binaries()
needs_slurm = pytest.mark.skipif(bool(MISSING) and not IN_CI, reason=f"Slurm/munge binaries missing: {MISSING}")

STEPS = 30
CONFIG = "configs/train/tiny_cpu.yaml"
BASE = ["train.seq_len=128", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
        f"train.steps={STEPS}", "run.wandb_mode=disabled", "parallel.dp=2", "train.log_interval=5"]
# Deterministic metrics compared between runs (not timings).
KEYS = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "tokens", "batch_digest",
        "expert_bias_norm", "expert_load/cv")
CLI = [sys.executable, "-m", "mimo_train.launch.cli"]
JOB_TIMEOUT_S = 240


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def assert_equal_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), [r["step"] for r in got]
    for a, b in zip(got, want):
        for key in KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted run: the same config on 2 local ranks (torchrun, gloo), no Slurm."""
    run_dir = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*CLI, "train", "--config", CONFIG, "--nproc", "2", *BASE, f"run.dir={run_dir}"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    records = read_metrics(run_dir)
    assert len(records) == STEPS
    return records


def _cluster(tmp_path_factory, kind):
    cluster = SlurmCluster(tmp_path_factory.mktemp(f"slurm-{kind}"), kind)
    try:
        cluster.start()  # raises with every daemon log if a daemon does not come up
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="class")
def one_node(tmp_path_factory):
    yield from _cluster(tmp_path_factory, "one")


@pytest.fixture(scope="class")
def two_nodes(tmp_path_factory):
    yield from _cluster(tmp_path_factory, "two")


# ---- helpers -----------------------------------------------------------------------------------------------------
class Job:
    def __init__(self, cluster: SlurmCluster, run_dir: Path, nodes: int, tasks_per_node: int, *extra: str):
        self.cluster, self.run_dir = cluster, run_dir
        cmd = [*CLI, "submit", "--config", CONFIG, "--nodes", str(nodes), "--gpus-per-node", "0",
               "--tasks-per-node", str(tasks_per_node), "--signal-lead", "60", *BASE, f"run.dir={run_dir}", *extra]
        env = {**cluster.env, "MIMO_SIGNAL_RESEND_S": "2"}
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        m = re.search(r"submitted job (\d+)", res.stdout)
        assert m, res.stdout
        self.id = m.group(1)

    def info(self) -> dict[str, str]:
        res = self.cluster._run(["scontrol", "show", "job", "-o", self.id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    def log(self) -> str:
        path = self.run_dir / f"slurm-{self.id}.out"
        return path.read_text(errors="replace") if path.is_file() else "(no job log yet)"

    def explain(self) -> str:
        return f"job {self.id}: {self.info()}\n---- job log ----\n{self.log()}\n{self.cluster.logs(2000)}"

    def wait_for(self, cond, what: str, timeout: float = JOB_TIMEOUT_S) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if cond():
                return time.time() - t0
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.explain()}")

    def wait_done(self, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        self.wait_for(lambda: self.info().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY"), "the job to end", timeout)
        return self.info()

    def signal_batch(self, sig: str = "USR1") -> None:
        """What `#SBATCH --signal=B:USR1@lead` does before the time limit: signal the batch shell only."""
        self.cluster._run(["scancel", f"--signal={sig}", "--batch", self.id])


def task_pids(job_id: str, procid: int) -> list[int]:
    """The trainer process of one Slurm task (found by its environment; the top one if it has children)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
            cmdline = (d / "cmdline").read_text().split("\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(procid)
                and Path(cmdline[0]).name.startswith("python") and "mimo_train.launch.cli" in cmdline and "train" in cmdline):
            found[int(d.name)] = ppid
    return [pid for pid, ppid in found.items() if ppid not in found]


def run_requeue_scenario(cluster: SlurmCluster, run_dir: Path, nodes: int, tasks_per_node: int,
                         reference: list[dict]) -> None:
    t0 = time.time()
    job = Job(cluster, run_dir, nodes, tasks_per_node)
    job.wait_for(lambda: len(read_metrics(run_dir)) >= 3, "3 training steps")
    job.signal_batch("USR1")
    info = job.wait_done()
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.explain()
    assert info["Restarts"] == "1", job.explain()  # requeued once, and not again once complete
    m = re.search(r"checkpoint at step (\d+) of \d+: requeueing job", log)
    assert m, job.explain()
    step = int(m.group(1))
    assert 3 <= step < STEPS, job.explain()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in log, job.explain()
    assert "training finished: checkpoint at step 30" in log, job.explain()
    assert log.count("(restart 1)") >= 1 and "(restart 2)" not in log, job.explain()
    got = read_metrics(run_dir)
    assert_equal_metrics(got, reference)
    print(f"\n[{cluster.kind}] job {job.id}: USR1 after step >= 3, checkpoint at step {step}, requeued, resumed, "
          f"finished in {time.time() - t0:.0f} s; {STEPS} steps equal to the uninterrupted run")
    _print_table(got, reference, step)


def _print_table(got, reference, step) -> None:
    print(f"{'step':>5} {'uninterrupted loss':>20} {'requeued loss':>20} {'grad_norm equal':>16}")
    for s in sorted({1, step, step + 1, STEPS}):
        a, b = reference[s - 1], got[s - 1]
        print(f"{s:>5} {a['loss']:>20.12f} {b['loss']:>20.12f} {str(a['grad_norm'] == b['grad_norm']):>16}")


# ---- tests -------------------------------------------------------------------------------------------------------
def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "submit", "--config", CONFIG, "--dry-run", *args], capture_output=True, text=True,
                          timeout=120)


def test_submit_dry_run_renders_a_valid_script(tmp_path):
    res = _dry_run("--nodes", "64", "--gpus-per-node", "8", "--partition", "gpu", "--account", "llm", "--time",
                   "04:00:00", "--cpus-per-task", "16", "--container-image", "nvcr.io/x/mimo:1", "--container-mounts",
                   "/data:/data", "--env", "NCCL_SOCKET_IFNAME=ib0", "--exclusive",
                   "parallel.dp=128", "parallel.tp=4", f"run.dir={tmp_path / 'big'}")
    assert res.returncode == 0, res.stderr
    script = res.stdout
    for line in ("#SBATCH --nodes=64", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=llm", "#SBATCH --time=04:00:00",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@600", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'big'}/slurm-%j.out", "export NCCL_SOCKET_IFNAME=ib0"):
        assert line in script.splitlines(), line
    assert "--container-image=nvcr.io/x/mimo:1" in script and "--container-mounts=/data:/data" in script
    assert re.search(r"TRAIN=\(mimo-train train --config \S+tiny_cpu.yaml --resume auto parallel.dp=128", script)
    assert "srun --kill-on-bad-exit=1 --nodes=64 --ntasks=512 --ntasks-per-node=8" in script
    assert "{{" not in script
    assert not (tmp_path / "big").exists()  # a dry run writes nothing
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr

    cpu = _dry_run("--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "parallel.dp=2")
    assert cpu.returncode == 0, cpu.stderr
    assert "--gpus-per-node" not in cpu.stdout.split("#SBATCH --requeue")[0].split("#SBATCH --job-name")[1]
    assert f"TRAIN=({sys.executable} -m mimo_train.launch.cli train" in cpu.stdout


def test_submit_rejects_a_layout_that_does_not_fit_the_allocation():
    res = _dry_run("--nodes", "2", "--gpus-per-node", "0", "parallel.dp=4")
    assert res.returncode == 2
    assert "must equal the world size 2" in res.stderr and "--nodes 2 x 1 tasks per node" in res.stderr, res.stderr
    res = _dry_run("--nodes", "1", "--gpus-per-node", "8", "--tasks-per-node", "4")
    assert res.returncode == 2 and "one task per GPU" in res.stderr, res.stderr


@needs_slurm
class TestOneNode:
    def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_metrics(self, one_node, reference, tmp_path):
        run_requeue_scenario(one_node, tmp_path / "run", 1, 2, reference)

    def test_killed_task_fails_the_job_and_keeps_the_last_checkpoint(self, one_node, reference, tmp_path):
        from mimo_train.training import checkpoint as ckpt

        run_dir = tmp_path / "run"
        job = Job(one_node, run_dir, 1, 2, "train.save_interval=5")
        job.wait_for(lambda: ckpt.find_latest(run_dir / "checkpoints") is not None and len(read_metrics(run_dir)) >= 7,
                     "a checkpoint and 7 steps")
        pids = task_pids(job.id, 1)
        assert len(pids) == 1, (pids, job.explain())
        killed_after = len(read_metrics(run_dir))
        os.kill(pids[0], signal.SIGKILL)  # a real task process dies
        info = job.wait_done()
        log = job.log()
        assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", job.explain()
        assert info["Restarts"] == "0", job.explain()
        assert "ERROR: the tasks failed" in log and "Not requeued" in log, job.explain()
        latest = ckpt.find_latest(run_dir / "checkpoints")
        assert latest is not None and ckpt.is_complete(latest), job.explain()
        step = ckpt.read_meta(latest)["step"]
        assert step % 5 == 0 and step < STEPS, job.explain()
        assert f"newest complete checkpoint (step {step})" in log, job.explain()

        # `--resume auto` after the failure: a resubmission loads that checkpoint and finishes the run exactly.
        again = Job(one_node, run_dir, 1, 2, "train.save_interval=5")
        info = again.wait_done()
        assert info["JobState"] == "COMPLETED", again.explain()
        assert f"resumed from {latest} at step {step}" in again.log(), again.explain()
        assert_equal_metrics(read_metrics(run_dir), reference)
        print(f"\n[one] job {job.id}: task 1 killed after step {killed_after}; job FAILED, "
              f"checkpoint step {step} intact; job {again.id} resumed from it and matched the uninterrupted run")

    def test_preemption_checkpoints_requeues_and_resumes_to_the_uninterrupted_metrics(self, one_node, reference,
                                                                                    tmp_path):
        """A job in the `urgent` partition preempts ours (PreemptMode=REQUEUE, GraceTime): Slurm sends TERM to the
        tasks, the trainer checkpoints and exits 0 within the grace time, and the script requeues the job (Slurm
        does not requeue a job that ended by itself). With a data-loader prefetch worker: the TERM that Slurm sends
        to every process of the step must not kill it before the trainer has checkpointed."""
        run_dir = tmp_path / "run"
        t0 = time.time()
        job = Job(one_node, run_dir, 1, 2, "data.num_workers=1")
        job.wait_for(lambda: len(read_metrics(run_dir)) >= 3, "3 training steps")
        res = one_node._run(["sbatch", "--parsable", "-p", "urgent", "-n", "2", "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "sleep 2"])
        urgent = res.stdout.strip()
        info = job.wait_done()
        log = job.log()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job.explain()
        m = re.search(r"preempted \(tasks exit code 0\), checkpoint at step (\d+) of", log)
        assert m, job.explain()
        step = int(m.group(1))
        assert 3 <= step < STEPS, job.explain()
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in log, job.explain()
        urgent_info = dict(re.findall(r"(\w+)=(\S*)", one_node._run(["scontrol", "show", "job", "-o", urgent]).stdout))
        assert urgent_info["JobState"] == "COMPLETED", urgent_info
        got = read_metrics(run_dir)
        assert_equal_metrics(got, reference)
        print(f"\n[one] job {job.id}: preempted by job {urgent} after step >= 3, checkpoint at step {step}, requeued, "
              f"resumed, finished in {time.time() - t0:.0f} s; {STEPS} steps equal to the uninterrupted run")
        _print_table(got, reference, step)


@needs_slurm
class TestTwoNodes:
    def test_usr1_requeue_across_two_nodes_resumes_to_the_uninterrupted_metrics(self, two_nodes, reference, tmp_path):
        run_requeue_scenario(two_nodes, tmp_path / "run", 2, 1, reference)

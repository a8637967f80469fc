"""A real Slurm cluster on this machine for the tests (Debian's slurm-wlm 22.05 with munge), set up as
Debian documents it, but private: its own slurm.conf, ports, spool, state, logs and PID
files under one directory, so it never touches /etc/slurm or a cluster already running here.

    one node:        NodeName=localhost, CPUs=2 (two tasks fit)
    two fake nodes:  NodeName=n1 and n2 on this host (NodeAddr 127.0.0.1, one port each), CPUs=1 each

Every daemon this module starts (munged only when none answers, slurmctld, one slurmd per node) is stopped by its
PID in `stop()`, SIGTERM first and SIGKILL after a grace period. Clients find the cluster through SLURM_CONF
(`cluster.env`). Standalone use:

    python tests/scripts/slurm_cluster.py one|two DIR     # start, print SLURM_CONF; SIGTERM or Ctrl-C stops it
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munged", "munge", "unmunge")
KILL_WAIT_S = 60  # seconds between SIGTERM and SIGKILL when Slurm ends a job (time limit, preemption, scancel)


def which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


class ClusterError(RuntimeError):
    pass


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _munge_ok(timeout: float = 10) -> bool:
    try:
        cred = subprocess.run([which("munge"), "-n"], capture_output=True, timeout=timeout)
        if cred.returncode != 0:
            return False
        out = subprocess.run([which("unmunge")], input=cred.stdout, capture_output=True, timeout=timeout)
        return out.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmCluster:
    def __init__(self, root: str | Path, kind: str = "one", first_job_id: int | None = None) -> None:
        if kind not in ("one", "two"):
            raise ValueError(f"kind: 'one' or 'two', got {kind!r}")
        self.root = Path(root).resolve()
        self.kind = kind
        self.nodes = [("localhost", 2)] if kind == "one" else [("n1", 1), ("n2", 1)]
        self.first_job_id = first_job_id or 1000 + (os.getpid() % 5000) * 10 + (0 if kind == "one" else 5)
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []  # (name, process, log) in start order
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- configuration ------------------------------------------------------------------------------------------
    def write_config(self) -> None:
        user = pwd.getpwuid(os.geteuid()).pw_name
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for name, _ in self.nodes:
            (r / "spool" / name).mkdir(exist_ok=True)
        lines = [
            f"ClusterName=mimo{self.kind}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmUser={user}",
            "AuthType=auth/munge",
            # A requeued job may start again only after the step credential lifetime (cred_expire, default 120 s).
            "AuthInfo=cred_expire=10",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # the configured CPUs/memory count, whatever this machine has
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000",
            f"KillWait={KILL_WAIT_S}",
            "MinJobAge=3600",  # keep finished jobs visible to scontrol (there is no accounting database)
            "JobRequeue=1",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "InactiveLimit=0",
            f"FirstJobId={self.first_job_id}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for (name, cpus), port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                         f"RealMemory=1000 State=UNKNOWN")
        # Preemption as production clusters set it up: a job in `urgent` preempts jobs in `debug`, which are sent
        # SIGTERM, given GraceTime seconds, and requeued by Slurm (PreemptMode=REQUEUE).
        nodes = ",".join(n for n, _ in self.nodes)
        lines.append(f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                     f"PreemptMode=REQUEUE GraceTime={KILL_WAIT_S}")
        lines.append(f"PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF")
        self.conf.write_text("\n".join(lines) + "\n")

    # ---- daemons ------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = self.root / "log" / f"{name}.stdout"
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True, **kw)
        self.procs.append((name, proc, log))
        return proc

    def _start_munged(self) -> None:
        if _munge_ok():
            return  # a munged already answers: use it, and leave it alone
        if os.geteuid() != 0:
            raise ClusterError("munged is not running and only root can start it (as the munge user)")
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        self._spawn("munged", [which("munged"), "-F"], user="munge", group="munge")
        self._wait(_munge_ok, 20, "munged did not answer `munge -n | unmunge`")

    def start(self, timeout: float = 90) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"missing Slurm/munge binaries: {missing} (apt-get install slurmctld slurmd slurm-client munge)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        try:
            self._start_munged()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                       "slurmctld did not answer `scontrol ping`")
            for name, _ in self.nodes:
                self._spawn(f"slurmd-{name}", [which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, "the nodes did not become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        self._check_alive()
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(name) == "idle" for name, _ in self.nodes)

    def _check_alive(self) -> None:
        for name, proc, _ in self.procs:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}\n{self.logs()}")

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise ClusterError(f"{what} within {timeout:.0f} s\n{self.logs()}")

    def _run(self, cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr}")
        return res

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")) if (self.root / "log").is_dir() else []:
            text = f.read_text(errors="replace")
            parts.append(f"---- {f} ----\n{text[-tail:]}")
        return "\n".join(parts)

    def stop(self, grace: float = 15) -> None:
        """Cancel whatever still runs, then stop every daemon started here by its PID (newest first)."""
        if any(name == "slurmctld" and p.poll() is None for name, p, _ in self.procs):
            try:
                self._run(["scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False)
                deadline = time.time() + grace
                while time.time() < deadline and self._run(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=grace)
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    kind, root = sys.argv[1], sys.argv[2]
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.append(1))
    with SlurmCluster(root, kind) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # cluster up; SIGTERM or Ctrl-C stops it", flush=True)
        while not stopped:
            time.sleep(0.5)

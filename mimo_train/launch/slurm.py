"""`mimo-train submit`: render the batch script from `slurm/train.sbatch.template`, write it into the run directory
and submit it with sbatch (`--dry-run` prints it instead).

The script starts one task per GPU with srun (no torchrun inside), exports MASTER_ADDR / MASTER_PORT for the
rendezvous, and runs `mimo-train train --config ... --resume auto key=value...` in every task. It asks Slurm for
USR1 some time before the time limit (`--signal=B:USR1@lead`), forwards it to the tasks (which checkpoint at the
next step boundary and exit 0) and requeues the job, which then resumes from that checkpoint. See the comments in
the template and README "Running on a Slurm cluster".
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mimo_train.config import ConfigError, load_config

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch.template"
SCRIPT_NAME = "submit.sbatch"
DEFAULT_SIGNAL_LEAD_S = 600
DEFAULT_RESEND_S = 10
DEFAULT_MAX_REQUEUES = 100


def _q(value) -> str:
    return shlex.quote(str(value))


def render(template: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a placeholder without a value is an error (never a silently broken script)."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return str(values[m.group(1)])

    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def _task_command(args, container: bool) -> list[str]:
    if args.command:
        return shlex.split(args.command)
    return ["mimo-train"] if container else [sys.executable, "-m", "mimo_train.launch.cli"]


def build_script(args, workdir: Path | None = None) -> tuple[str, Path]:
    """The batch script for `args` and the run directory it belongs to. Validates the config and the layout
    against nodes x tasks-per-node first, so a bad submission fails here, not after queueing."""
    workdir = (workdir or Path.cwd()).resolve()
    cfg = load_config(args.config, args.overrides)
    tasks_per_node, ntasks = _check_allocation(args, cfg)
    run_dir = Path(cfg.run.dir)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    config = Path(args.config)
    config = config if config.is_absolute() else workdir / config
    container = bool(args.container_image)
    train = [*_task_command(args, container), "train", "--config", str(config), "--resume", "auto", *args.overrides]
    values = {
        "job_name": args.job_name or f"mimo-{run_dir.name}",
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node,
        "ntasks": ntasks,
        "sbatch_lines": "\n".join(f"#SBATCH {line}" for line in _sbatch_options(args))
                        or "# (no further #SBATCH options)",
        "signal_lead": args.signal_lead,
        "log_file": run_dir / "slurm-%j.out",
        "workdir": workdir,
        "run_dir": _q(run_dir),
        "total_steps": cfg.train.steps,
        "max_requeues": args.max_requeues,
        "resend_s": DEFAULT_RESEND_S,
        "train_command": " ".join(_q(a) for a in train),
        "srun_extra": " ".join(_q(a) for a in _srun_options(args, container, workdir)),
        "env_lines": "\n".join(_env_lines(args)) or "# (no --env settings)",
    }
    for key in ("log_file", "workdir"):
        if any(c.isspace() for c in str(values[key])):
            raise ConfigError(f"{key} {values[key]!r}: #SBATCH lines cannot hold whitespace in paths")
    return render(TEMPLATE.read_text(), values), run_dir


def _check_allocation(args, cfg) -> tuple[int, int]:
    """(tasks per node, tasks) of the submission, once the config's layouts, batches and memory fit them."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1 (got {args.nodes})")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: must be >= 0 (got {args.gpus_per_node})")
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    if args.gpus_per_node and tasks_per_node != args.gpus_per_node:
        raise ConfigError(f"--tasks-per-node={tasks_per_node}: must equal --gpus-per-node={args.gpus_per_node} "
                          f"(one task per GPU)")
    ntasks = args.nodes * tasks_per_node
    from mimo_train.launch.preflight import check_layouts

    allocation = f"--nodes {args.nodes} x {tasks_per_node} tasks per node = {ntasks} ranks"
    try:
        plan = check_layouts(cfg, ntasks, batches=False)  # every stage, dp: auto resolved against the task count
    except ConfigError as e:
        raise ConfigError(f"{e} ({allocation})") from None
    try:
        plan.check_batches()
    except ConfigError as e:
        if not args.dry_run:  # a job whose tasks would refuse to start is not queued
            raise ConfigError(f"{e} ({allocation})") from None
        print(f"warning: {e} ({allocation}): the job's tasks would refuse to start; override the batch sizes",
              file=sys.stderr, flush=True)
    if args.gpus_per_node and cfg.train.device != "cpu" and not getattr(args, "skip_memory_check", False):
        from mimo_train.planning.plan_check import check_memory, gpu_type

        check_memory(cfg, ntasks, gpu_type(getattr(args, "gpu_type", "h100")))  # before queueing for the GPUs
    if args.signal_lead < 1:
        raise ConfigError(f"--signal-lead: must be >= 1 second (got {args.signal_lead})")
    return tasks_per_node, ntasks


def _sbatch_options(args) -> list[str]:
    sbatch = []
    if args.gpus_per_node:
        sbatch.append(f"--gpus-per-node={args.gpus_per_node}")
    for flag, value in (("cpus-per-task", args.cpus_per_task), ("partition", args.partition),
                        ("account", args.account), ("qos", args.qos), ("time", args.time), ("mem", args.mem)):
        if value:
            sbatch.append(f"--{flag}={value}")
    if args.exclusive:
        sbatch.append("--exclusive")
    return sbatch + args.sbatch_arg


def _srun_options(args, container: bool, workdir: Path) -> list[str]:
    srun = []
    if args.cpus_per_task:
        srun.append(f"--cpus-per-task={args.cpus_per_task}")  # srun no longer inherits it from the job (22.05+)
    if container:
        srun += [f"--container-image={args.container_image}", f"--container-workdir={workdir}"]
        if args.container_mounts:
            srun.append(f"--container-mounts={args.container_mounts}")
    return srun + args.srun_arg


def _env_lines(args) -> list[str]:
    lines = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item!r}: expected NAME=VALUE")
        lines.append(f"export {key}={_q(value)}")
    return lines


def submit(args) -> int:
    script, run_dir = build_script(args)
    if args.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("error: sbatch not found on PATH (is this a Slurm login node?)", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SCRIPT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    res = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        print(f"error: sbatch failed (exit {res.returncode}): {res.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = res.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: script {path}, log {run_dir / f'slurm-{job_id}.out'}", flush=True)
    return 0


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "submit", help="write an sbatch script into the run directory and submit it (Slurm)",
        description="Render slurm/train.sbatch.template for this config and layout, write it to "
                    f"<run.dir>/{SCRIPT_NAME} and submit it with sbatch. The job runs one task per GPU with srun, "
                    "checkpoints and requeues itself on USR1 before its time limit, and resumes with --resume auto.")
    p.add_argument("--config", required=True, help="a training YAML (configs/train/*.yaml)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes (sbatch --nodes)")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node, one task each; 0: CPU tasks (gloo), see --tasks-per-node")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="tasks per node (default: --gpus-per-node, or 1 with --gpus-per-node 0)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per task (also OMP_NUM_THREADS)")
    p.add_argument("--partition", help="Slurm partition (sbatch --partition)")
    p.add_argument("--account", help="Slurm account to charge (sbatch --account)")
    p.add_argument("--qos", help="quality of service (sbatch --qos)")
    p.add_argument("--time", help="time limit, in any Slurm format (e.g. 04:00:00)")
    p.add_argument("--mem", help="memory per node (e.g. 0 for all of it)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--job-name", help="job name (default mimo-<run.dir name>)")
    p.add_argument("--container-image", help="run the tasks in this image (pyxis/enroot: srun --container-image)")
    p.add_argument("--container-mounts", help="srun --container-mounts (the repository, data and run directories)")
    p.add_argument("--command", help="the mimo-train command the tasks run (default: this Python's "
                                     "`-m mimo_train.launch.cli`; `mimo-train` with --container-image)")
    p.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S,
                   help=f"seconds before the time limit at which USR1 asks for a checkpoint and a requeue "
                        f"(default {DEFAULT_SIGNAL_LEAD_S}; it must cover one step plus one checkpoint save)")
    p.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help=f"stop requeueing after this many restarts (default {DEFAULT_MAX_REQUEUES})")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export in the batch script (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH option (repeatable), e.g. --sbatch-arg=--reservation=big")
    p.add_argument("--srun-arg", action="append", default=[], metavar="ARG",
                   help="an extra srun option (repeatable), e.g. --srun-arg=--cpu-bind=none")
    p.add_argument("--gpu-type", default="h100", help="the cluster's GPUs, for the memory check (h100, h200, "
                                                        "b200; default h100)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="submit even when the planner estimates that a stage's layout does not fit the GPUs")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, passed to every task")
    p.set_defaults(func=submit)
    return p

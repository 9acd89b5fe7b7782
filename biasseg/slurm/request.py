"""Check a SLURM job request against its partition before submitting it.

A request the partition can never hold (more CPUs, memory or GPUs per node than any of its
nodes has, a longer time limit than it allows, a partition that does not exist) is accepted
by ``sbatch`` and then pends forever with nothing said. :func:`request_problem` reads the
partition (``scontrol show partition``, ``sinfo`` per node) and names the first key that does
not fit and what would; ``sbatch --test-only`` with the same options then catches what SLURM
itself refuses (an unknown account or QoS, a constraint no node has). Where SLURM cannot be
queried, :func:`request_problem` says so and lets the job be submitted.

Requests are hydra-submitit-launcher's parameters (``hydra.launcher.*``; memory in GB,
times in minutes); SLURM's memory is in MB.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

QUERY_TIMEOUT_S = 20  # a controller that does not answer in this time counts as "cannot be queried"


class CannotQuery(Exception):
    """SLURM cannot be asked (commands missing, controller down); the message says why."""


@dataclass(frozen=True)
class Partition:
    """What one node of a partition offers at most, and the partition's own limits."""

    name: str
    nodes: int
    cpus_per_node: int
    mem_mb_per_node: int
    gpus_per_node: int
    max_time_min: float | None  # None: unlimited
    max_nodes: int | None  # None: unlimited


def _run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """``command``'s result; :class:`CannotQuery` when it is missing, does not answer, or (with
    ``check``) fails."""
    if shutil.which(command[0]) is None:
        raise CannotQuery(f"{command[0]} is not installed")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CannotQuery(f"{' '.join(command[:2])} did not answer in {QUERY_TIMEOUT_S} s") from None
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise CannotQuery(f"{' '.join(command[:3])}: {said[-1] if said else f'exit status {done.returncode}'}")
    return done


def slurm_minutes(text: str) -> float | None:
    """A SLURM time (``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``,
    ``days-hours[:minutes[:seconds]]``; ``UNLIMITED``: None) in minutes."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, dash, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if dash:  # after the days: hours first
        hours, minutes, seconds = (parts + [0.0, 0.0])[:3]
    else:
        hours, minutes, seconds = ([0.0] + parts if len(parts) == 2 else [0.0, parts[0], 0.0] if len(parts) == 1 else parts)[:3]
    return float(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def gpu_count(gres: str) -> int:
    """GPUs in a node's GRES string, e.g. ``gpu:a100:4(S:0-1),shard:8`` → 4."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def partition_names() -> tuple[list[str], str | None]:
    """Every partition, and the default one (``scontrol show partition``)."""
    names, default = [], None
    for line in _run(["scontrol", "show", "partition", "-o"]).stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "PartitionName" in fields:
            names.append(fields["PartitionName"])
            if fields.get("Default") == "YES":
                default = fields["PartitionName"]
    return names, default


def read_partition(name: str) -> Partition:
    """The partition's limits and the largest of its nodes (CPUs, memory, GPUs)."""
    line = _run(["scontrol", "show", "partition", name, "-o"]).stdout.strip()
    fields = dict(re.findall(r"(\w+)=(\S*)", line))
    nodes = [row.split("|") for row in _run(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"]).stdout.splitlines() if row]
    max_nodes = fields.get("MaxNodes", "UNLIMITED")
    return Partition(
        name=name,
        nodes=len({row[0] for row in nodes}),
        cpus_per_node=max((int(row[1]) for row in nodes), default=0),
        mem_mb_per_node=max((int(re.sub(r"\D", "", row[2]) or 0) for row in nodes), default=0),
        gpus_per_node=max((gpu_count(row[3]) for row in nodes), default=0),
        max_time_min=slurm_minutes(fields.get("MaxTime", "UNLIMITED")),
        max_nodes=None if max_nodes.upper() == "UNLIMITED" else int(max_nodes),
    )


def _number(params: Mapping[str, object], key: str, default: float = 0) -> float:
    value = params.get(key)
    return default if value is None else float(value)  # type: ignore[arg-type]


def misfit(params: Mapping[str, object], partition: Partition) -> str | None:
    """The first part of the request the partition cannot hold, as one line naming the
    ``hydra.launcher`` key, the partition's limit and a value that fits; None if it fits."""
    key = "hydra.launcher."
    where = f"partition {partition.name}"
    tasks = int(_number(params, "tasks_per_node", 1))
    cpus = int(_number(params, "cpus_per_task", 1)) * tasks
    if cpus > partition.cpus_per_node:
        fits = max(partition.cpus_per_node // max(tasks, 1), 1)
        per = f" × tasks_per_node={tasks} = {cpus}" if tasks > 1 else ""
        return (f"{key}cpus_per_task={int(_number(params, 'cpus_per_task', 1))}{per} > {partition.cpus_per_node} CPUs per "
                f"node in {where}; use {key}cpus_per_task={fits} or less")
    mem_mb = _number(params, "mem_gb") * 1024
    if partition.mem_mb_per_node and mem_mb > partition.mem_mb_per_node:
        return (f"{key}mem_gb={params.get('mem_gb')} > {partition.mem_mb_per_node / 1024:.1f} GB per node in {where}; "
                f"use {key}mem_gb={int(partition.mem_mb_per_node // 1024)} or less")
    gpus = int(_number(params, "gpus_per_node"))
    if gpus > partition.gpus_per_node:
        fix = ("trainer=cpu (or trainer.accelerator=cpu)" if partition.gpus_per_node == 0
               else f"{key}gpus_per_node={partition.gpus_per_node} (trainer.devices)")
        return f"{key}gpus_per_node={gpus} > {partition.gpus_per_node} GPUs per node in {where}; use {fix}"
    minutes = _number(params, "timeout_min")
    if partition.max_time_min is not None and minutes > partition.max_time_min:
        return (f"{key}timeout_min={params.get('timeout_min')} > the {partition.max_time_min:g}-minute time limit of {where}; "
                f"use {key}timeout_min={int(partition.max_time_min)} or less (requeued runs continue from last.ckpt)")
    nodes = int(_number(params, "nodes", 1))
    most = min(partition.nodes, partition.max_nodes or partition.nodes)
    if nodes > most:
        return f"{key}nodes={nodes} > {most} node(s) in {where}; use {key}nodes={most} or less (trainer.num_nodes)"
    return None


def sbatch_options(params: Mapping[str, object], partition: str) -> list[str]:
    """The request as ``sbatch`` options (for ``--test-only``)."""
    options = [f"--partition={partition}", f"--nodes={int(_number(params, 'nodes', 1))}",
               f"--ntasks-per-node={int(_number(params, 'tasks_per_node', 1))}",
               f"--cpus-per-task={int(_number(params, 'cpus_per_task', 1))}"]
    if params.get("mem_gb") is not None:
        options.append(f"--mem={int(_number(params, 'mem_gb') * 1024)}M")
    if int(_number(params, "gpus_per_node")) > 0:
        options.append(f"--gpus-per-node={int(_number(params, 'gpus_per_node'))}")
    if params.get("timeout_min") is not None:
        options.append(f"--time={int(_number(params, 'timeout_min'))}")
    for name in ("account", "qos", "constraint", "exclude", "gres"):
        if params.get(name):
            options.append(f"--{name}={params[name]}")
    for name, value in dict(params.get("additional_parameters") or {}).items():  # type: ignore[call-overload]
        options.append(f"--{str(name).replace('_', '-')}={value}")
    return options


def sbatch_refusal(params: Mapping[str, object], partition: str) -> str | None:
    """What ``sbatch --test-only`` refuses in this request (nothing is submitted), or None."""
    done = _run(["sbatch", "--test-only", *sbatch_options(params, partition), "--wrap", "true"], check=False)
    if done.returncode == 0:
        return None
    said = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return (f"SLURM refuses the request ({' '.join(sbatch_options(params, partition))}): {'; '.join(said[-2:])}; "
            f"see hydra.launcher.* (account, qos, additional_parameters)")


def request_problem(params: Mapping[str, object]) -> str | None:
    """Why the request cannot run on its partition (one line), or None when it fits (with
    several partitions, ``a,b``, when it fits one of them). :class:`CannotQuery` when SLURM
    cannot be asked."""
    names, default = partition_names()
    requested = str(params.get("partition") or default or "")
    if not requested:
        return "hydra.launcher.partition is not set and the cluster has no default partition; " \
               f"use one of: {', '.join(names)}"
    wanted = [name.strip() for name in requested.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        return f"hydra.launcher.partition={requested}: no such partition {', '.join(unknown)}; use one of: {', '.join(names) or '(none)'}"
    misfits = [misfit(params, read_partition(name)) for name in wanted]
    if all(misfits):
        return misfits[0]
    return sbatch_refusal(params, requested)

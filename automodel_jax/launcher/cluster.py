"""Pure detection of a multi-process JAX cluster from environment variables.

Everything here is a function of an env mapping, so each launch mode (explicit variables, Slurm one process per
node, Slurm one process per GPU) is testable without a cluster. `scontrol` is not needed: compressed Slurm node
lists are expanded here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Coordinator port derived from the Slurm job id, so concurrent jobs sharing a node do not collide. The sbatch
# script renders the same formula (see slurm.py), keeping one source of truth.
PORT_BASE = 20000
PORT_SPAN = 20000


class ClusterConfigError(ValueError):
    """The environment describes a cluster inconsistently; the message names the variable and the fix."""


@dataclass(frozen=True)
class ClusterSpec:
    """Arguments for `jax.distributed.initialize`, plus where they came from ("env" or "slurm")."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    source: str


def derive_port(job_id: int) -> int:
    """Coordinator port for a Slurm job when COORDINATOR_PORT is not set."""
    return PORT_BASE + job_id % PORT_SPAN


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ClusterConfigError(f"node list {text!r}: unbalanced ']'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ClusterConfigError(f"node list {text!r}: unbalanced '['")
    parts.append("".join(current))
    return [part for part in parts if part]


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'], keeping the zero padding of each range's start."""
    values = []
    for item in body.split(","):
        start, sep, end = item.partition("-")
        if not start.isdigit() or (sep and not end.isdigit()):
            raise ClusterConfigError(f"node list {nodelist!r}: bad range {item!r} (expected N or N-M)")
        if not sep:
            values.append(start)
            continue
        if int(end) < int(start):
            raise ClusterConfigError(f"node list {nodelist!r}: range {item!r} runs backwards")
        values.extend(str(n).zfill(len(start)) for n in range(int(start), int(end) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as 'node[01-03,07],gpu[1-2]-ib' into host names, in order."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\[\]]*\])", part)
        choices = [_expand_ranges(p[1:-1], nodelist) if p.startswith("[") else [p] for p in pieces if p]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ClusterConfigError(f"node list {nodelist!r} is empty")
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """Expand Slurm's tasks-per-node notation '2(x3),1' into [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ClusterConfigError(f"tasks per node {text!r}: bad item {item!r} (expected N or N(xM))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ClusterConfigError(f"{name}={value!r} is not an integer") from None


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ClusterConfigError(f"{name}={text!r} must be comma-separated integers, e.g. 0,1") from None


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterConfigError(f"{name}={address!r} must be host:port with a port in 1..65535")
    return address


def _check_rank(process_id: int, num_processes: int, source: str) -> None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ClusterConfigError(
            f"{source}: process id {process_id} out of range for {num_processes} processes (need 0 <= id < count)"
        )


def _from_explicit_env(env: Mapping[str, str]) -> ClusterSpec | None:
    num_processes = _int(env, "NUM_PROCESSES") if "NUM_PROCESSES" in env else None
    if num_processes == 1:
        return None
    missing = [name for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID") if name not in env]
    if missing:
        raise ClusterConfigError(
            f"multi-process env is incomplete: set {', '.join(missing)} too "
            "(COORDINATOR_ADDRESS=host:port, NUM_PROCESSES, PROCESS_ID), or NUM_PROCESSES=1 for one process"
        )
    process_id = _int(env, "PROCESS_ID")
    _check_rank(process_id, num_processes, "PROCESS_ID/NUM_PROCESSES")
    local_ids = _int_list(env["LOCAL_DEVICE_IDS"], "LOCAL_DEVICE_IDS") if env.get("LOCAL_DEVICE_IDS") else None
    return ClusterSpec(
        coordinator_address=_check_address(env["COORDINATOR_ADDRESS"], "COORDINATOR_ADDRESS"),
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_ids,
        source="env",
    )


def _visible_gpus(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """Device ids as JAX numbers them: CUDA_VISIBLE_DEVICES renumbers to 0..n-1; bare Slurm ids are physical."""
    cuda_visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if cuda_visible and cuda_visible != "NoDevFiles":
        return tuple(range(len([item for item in cuda_visible.split(",") if item.strip()])))
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name, "").strip():
            return _int_list(env[name], name)
    return None


def _slurm_local_devices(env: Mapping[str, str], tasks_on_node: int) -> tuple[int, ...] | None:
    """All visible GPUs for one task per node; this task's share (picked by SLURM_LOCALID) otherwise."""
    gpus = _visible_gpus(env)
    if gpus is None or tasks_on_node == 1 or len(gpus) == 1:
        return gpus
    if len(gpus) % tasks_on_node:
        raise ClusterConfigError(
            f"{len(gpus)} visible GPUs cannot be split evenly among {tasks_on_node} tasks on this node; "
            "use --gpus-per-node divisible by --tasks-per-node"
        )
    local_id = _int(env, "SLURM_LOCALID")
    per_task = len(gpus) // tasks_on_node
    return gpus[local_id * per_task : (local_id + 1) * per_task]


def _from_slurm(env: Mapping[str, str]) -> ClusterSpec | None:
    tasks_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    num_processes = _int(env, tasks_name) if tasks_name in env else 1
    if num_processes == 1:
        return None
    if "SLURM_STEP_NODELIST" not in env:
        raise ClusterConfigError(
            f"Slurm job has {num_processes} tasks but this process is not in an srun step; "
            "start it with srun (python -m automodel_jax.launch slurm does), or set NUM_PROCESSES=1"
        )
    process_id = _int(env, "SLURM_PROCID")
    _check_rank(process_id, num_processes, f"SLURM_PROCID/{tasks_name}")
    if "COORDINATOR_ADDRESS" in env:
        coordinator = _check_address(env["COORDINATOR_ADDRESS"], "COORDINATOR_ADDRESS")
    else:
        port = _int(env, "COORDINATOR_PORT") if "COORDINATOR_PORT" in env else derive_port(_int(env, "SLURM_JOB_ID"))
        if not 0 < port < 65536:
            raise ClusterConfigError(f"COORDINATOR_PORT={port} must be in 1..65535")
        coordinator = f"{expand_nodelist(env['SLURM_STEP_NODELIST'])[0]}:{port}"
    per_node_name = "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env else "SLURM_TASKS_PER_NODE"
    tasks_per_node = expand_tasks_per_node(env.get(per_node_name, "1"))
    node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if node_id >= len(tasks_per_node):
        raise ClusterConfigError(f"SLURM_NODEID={node_id} has no entry in {per_node_name}={env.get(per_node_name)!r}")
    return ClusterSpec(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=_slurm_local_devices(env, tasks_per_node[node_id]),
        source="slurm",
    )


def detect_cluster(env: Mapping[str, str]) -> ClusterSpec | None:
    """The multi-process spec the env describes, or None for a single process.

    Explicit NUM_PROCESSES/PROCESS_ID win over Slurm; COORDINATOR_ADDRESS alone overrides Slurm's coordinator.
    """
    if "NUM_PROCESSES" in env or "PROCESS_ID" in env:
        return _from_explicit_env(env)
    if "SLURM_JOB_ID" in env:
        return _from_slurm(env)
    if "COORDINATOR_ADDRESS" in env:
        return _from_explicit_env(env)
    return None

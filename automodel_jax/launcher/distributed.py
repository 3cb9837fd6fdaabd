"""Multi-process life cycle: detect the cluster, initialise `jax.distributed`, report the topology, agree across
processes (`any_process`), and leave the cluster cleanly or, on a failure, so that the other processes stop at once
(`leave_cluster`)."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import jax

from automodel_jax.launcher.cluster import ClusterSpec, detect_cluster

# JAX's own timeout aborts the process from C++ with a multi-line trace; ours fires first with one clear line.
_JAX_TIMEOUT_GRACE_S = 30
_PROBE_INTERVAL_S = 0.25
# Keys of the coordination service's key-value store (the JAX client's, shared by the processes of one run).
_FAILED_KEY = "automodel_jax/failed"  # "process I/N failed: REASON", set by the first process that fails
_FLAGS_PREFIX = "automodel_jax/flags/"  # + tag/process index: `any_process` votes
_WATCH_POLL_MS = 500
_FAILED_GRACE_S = 2.0  # a process that failed itself at about the same time reports its own error, not the peer's
_END_TIMEOUT_S = 24 * 3600  # the normal-end barrier waits for process 0's export; a failure ends it sooner


class DistributedInitError(RuntimeError):
    """This process could not join the cluster; the message names the coordinator and the timeout."""


@dataclass(frozen=True)
class DistributedInfo:
    """What this process joined: rank, sizes, and where the spec came from ("single", "env" or "slurm")."""

    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    coordinator_address: str | None
    source: str


def _wait_for_coordinator(spec: ClusterSpec, deadline: float, timeout_s: int) -> None:
    """Poll the coordinator's TCP port so an unreachable host fails with a Python error, not a C++ abort."""
    host, _, port = spec.coordinator_address.rpartition(":")
    host = host.strip("[]")
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return
        except socket.gaierror as error:
            raise DistributedInitError(
                f"process {spec.process_id}/{spec.num_processes}: cannot resolve coordinator host {host!r} "
                f"of {spec.coordinator_address} ({error.strerror})"
            ) from None
        except OSError:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"process {spec.process_id}/{spec.num_processes}: JAX coordinator {spec.coordinator_address} "
                    f"unreachable after {timeout_s}s (is process 0 running there, and the port open?)"
                ) from None
            time.sleep(_PROBE_INTERVAL_S)


def _check_port_free(spec: ClusterSpec) -> None:
    """Process 0 hosts the coordinator service; JAX crashes (SIGSEGV) if its port is taken, so check first."""
    port = int(spec.coordinator_address.rpartition(":")[2])
    try:  # JAX binds [::]:port; fall back to IPv4 where the kernel has no IPv6.
        sock, host = socket.socket(socket.AF_INET6), "::"
    except OSError:
        sock, host = socket.socket(socket.AF_INET), "0.0.0.0"
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise DistributedInitError(
                f"process 0/{spec.num_processes}: cannot listen on coordinator port {port} of "
                f"{spec.coordinator_address} ({error.strerror}); choose another COORDINATOR_PORT"
            ) from None


def _start_watchdog(spec: ClusterSpec, deadline: float, timeout_s: int) -> threading.Event:
    """Exit with one clear line if `jax.distributed.initialize` is still waiting at the deadline."""
    finished = threading.Event()

    def watch() -> None:
        if not finished.wait(max(0.0, deadline - time.monotonic())):
            print(
                f"DistributedInitError: process {spec.process_id}/{spec.num_processes}: not all "
                f"{spec.num_processes} processes joined JAX coordinator {spec.coordinator_address} within "
                f"{timeout_s}s (did every task start, with the same coordinator address?)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)

    threading.Thread(target=watch, name="distributed-init-watchdog", daemon=True).start()
    return finished


def _current_info(coordinator_address: str | None, source: str) -> DistributedInfo:
    return DistributedInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
        coordinator_address=coordinator_address,
        source=source,
    )


def initialize_distributed(timeout_s: int = 300) -> DistributedInfo:
    """Join the multi-process cluster described by the environment; a no-op for a single process.

    Call before any other JAX work. Raises ClusterConfigError for an inconsistent environment and
    DistributedInitError when the coordinator stays unreachable for `timeout_s` seconds; if the coordinator is
    reachable but not every process joins in time, the process exits with one line on stderr.
    """
    if timeout_s < 1:
        raise ValueError(f"timeout_s={timeout_s} must be at least 1 second")
    spec = detect_cluster(os.environ)
    if spec is None:
        return _current_info(None, "single")
    if jax.distributed.is_initialized():
        return _current_info(spec.coordinator_address, spec.source)
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives on CPU hosts (tests, CPU clusters) go through gloo over TCP.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.monotonic() + timeout_s
    if spec.process_id == 0:
        _check_port_free(spec)
    else:
        _wait_for_coordinator(spec, deadline, timeout_s)
    finished = _start_watchdog(spec, deadline, timeout_s)
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
            cluster_detection_method="deactivate",
            initialization_timeout=timeout_s + _JAX_TIMEOUT_GRACE_S,
            shutdown_timeout_seconds=timeout_s,  # how long leaving waits for a process that is gone
        )
    finally:
        finished.set()
    _watch_peers(spec)
    return _current_info(spec.coordinator_address, spec.source)


def _client():
    """The coordination-service client of `jax.distributed` (JAX has no public API for its key-value store and
    barriers; Orbax reads the same attribute)."""
    from jax._src import distributed
    return distributed.global_state.client


class _Watch:
    """State of this process's peer watcher: stopped (under `lock`) when the process leaves the cluster itself."""
    lock = threading.Lock()
    stopped = threading.Event()


def _watch_peers(spec: ClusterSpec) -> None:
    """Start a thread that ends this process with one line naming the failed process when another process announces
    a failure (`leave_cluster`) or the coordinator is lost; otherwise this process would wait in its next collective
    until JAX's heartbeat timeout aborts it with a C++ trace."""
    _Watch.stopped.clear()

    def watch() -> None:
        client = _client()
        while not _Watch.stopped.is_set():
            try:
                failure = client.blocking_key_value_get(_FAILED_KEY, _WATCH_POLL_MS)
            except Exception as error:  # noqa: BLE001 - the client raises one JaxRuntimeError type for every status
                if "DEADLINE_EXCEEDED" in str(error):
                    continue
                failure = (f"lost the JAX coordinator {spec.coordinator_address} (process 0 ended or is unreachable: "
                           f"{str(error).splitlines()[0]})")
            if _Watch.stopped.wait(_FAILED_GRACE_S):  # this process is failing too: it reports its own error
                return
            with _Watch.lock:
                if _Watch.stopped.is_set():
                    return
                print(f"error: {failure}; process {spec.process_id}/{spec.num_processes} stops too", file=sys.stderr,
                      flush=True)
                if failure.startswith("process "):  # the coordinator is up: leave it with the failed process
                    with contextlib.suppress(Exception):
                        jax.distributed.shutdown()
                sys.stderr.flush()
                os._exit(1)  # the main thread may be waiting in a collective that never completes

    thread = threading.Thread(target=watch, name="distributed-peer-watcher", daemon=True)
    thread.start()

    @atexit.register
    def stop_watching() -> None:  # a program that never calls leave_cluster: no thread left in a C++ call at exit
        _Watch.stopped.set()
        thread.join(timeout=2 * _WATCH_POLL_MS / 1000)


def any_process(flag: bool, tag: str, timeout_s: float) -> bool:
    """Whether `flag` is true on any process, the same answer on every process: each calls this with the same
    `tag` (unique per call, e.g. the step) at the same point of the program. One coordination-service barrier and one
    read, no device work; `flag` itself for a single process. Raises TimeoutError when the processes do not all arrive
    within `timeout_s`."""
    if not jax.distributed.is_initialized():
        return flag
    client = _client()
    if flag:
        client.key_value_set(f"{_FLAGS_PREFIX}{tag}/{jax.process_index()}", "1")
    try:
        client.wait_at_barrier(f"{_FLAGS_PREFIX}{tag}", int(timeout_s * 1000))
    except Exception as error:  # noqa: BLE001 - JaxRuntimeError for every status
        raise TimeoutError(f"process {jax.process_index()}/{jax.process_count()}: not every process reached "
                           f"'{tag}' within {timeout_s:.0f}s ({str(error).splitlines()[0]})") from None
    return bool(client.key_value_dir_get(f"{_FLAGS_PREFIX}{tag}/"))


def leave_cluster(code: int, failure: str | None = None) -> int:
    """End this process's part in a multi-process run and return `code` (a no-op for a single process).

    Normal end (`failure` None, whatever `code`): wait at a barrier until every process is here (a failure
    announced meanwhile still ends this process), then shut the client and (process 0) the coordinator down in that
    order, so that no process prints coordination-service errors. Call it after checkpoint managers are closed.
    Failure: announce "process I/N failed: FAILURE" to the others (they stop at once with a line naming this
    process and leave the coordination service with this one, so that no process prints its errors)."""
    if not jax.distributed.is_initialized():
        return code
    client = _client()
    if failure is None:
        client.wait_at_barrier("automodel_jax/end", _END_TIMEOUT_S * 1000)  # the watcher still ends a failed run
    with _Watch.lock:
        _Watch.stopped.set()
    if failure is None:
        jax.distributed.shutdown()  # client, then (process 0) coordinator; itself a barrier of every process
        return code
    with contextlib.suppress(Exception):  # ALREADY_EXISTS: another process failed first, and the others know
        client.key_value_set(_FAILED_KEY, f"process {jax.process_index()}/{jax.process_count()} failed: {failure}")
    with contextlib.suppress(Exception):  # the others' watchers join this shutdown; one that is gone times out
        jax.distributed.shutdown()
    return code


def describe_topology(mesh: jax.sharding.Mesh | None = None, echo: bool = True) -> str:
    """One line for this process (rank, device counts per process, kinds, mesh), also printed when `echo`.

    The per-process device counts come from the global device list, so any process shows a node that
    contributes one GPU instead of eight.
    """
    per_process = Counter(device.process_index for device in jax.devices())
    counts = [per_process[index] for index in range(jax.process_count())]
    kinds = sorted({device.device_kind for device in jax.local_devices()})
    line = (
        f"[topology] process {jax.process_index()}/{jax.process_count()} host {socket.gethostname()}: "
        f"local devices {jax.local_device_count()}, global devices {jax.device_count()}, "
        f"devices per process {counts}{'' if len(set(counts)) == 1 else ' UNEVEN'}, "
        f"platform {jax.default_backend()}, kinds {kinds}"
    )
    if mesh is not None:
        line += ", mesh " + " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    if echo:
        print(line, flush=True)
    return line

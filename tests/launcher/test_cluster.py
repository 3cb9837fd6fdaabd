"""detect_cluster and the Slurm list parsers, as pure functions of an env dict."""

import pytest

from automodel_jax.launcher.cluster import (
    ClusterConfigError,
    ClusterSpec,
    derive_port,
    detect_cluster,
    expand_nodelist,
    expand_tasks_per_node,
)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("single", ["single"]),
        ("a,b[1-2]", ["a", "b1", "b2"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("x[099-101],y", ["x099", "x100", "x101", "y"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, complaint",
    [("node[01-03", r"unbalanced '\['"), ("node]1", "unbalanced ']'"), ("node[3-1]", "backwards"),
     ("node[a-b]", "bad range"), ("", "empty")],
)
def test_expand_nodelist_rejects_malformed(nodelist, complaint):
    with pytest.raises(ClusterConfigError, match=complaint):
        expand_nodelist(nodelist)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ClusterConfigError, match="bad item 'x'"):
        expand_tasks_per_node("2,x")


def test_no_cluster_env_is_single_process():
    assert detect_cluster({}) is None
    assert detect_cluster({"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1"}) is None
    assert detect_cluster({"NUM_PROCESSES": "1"}) is None


def test_explicit_env():
    env = {"COORDINATOR_ADDRESS": "10.0.0.1:1234", "NUM_PROCESSES": "4", "PROCESS_ID": "3", "LOCAL_DEVICE_IDS": "2,3"}
    assert detect_cluster(env) == ClusterSpec("10.0.0.1:1234", 4, 3, (2, 3), "env")
    del env["LOCAL_DEVICE_IDS"]
    assert detect_cluster(env).local_device_ids is None


@pytest.mark.parametrize(
    "env, complaint",
    [
        ({"NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "set COORDINATOR_ADDRESS too"),
        ({"COORDINATOR_ADDRESS": "h:1"}, "set NUM_PROCESSES, PROCESS_ID too"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, "process id 2 out of range"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"}, "NUM_PROCESSES='two'"),
        ({"COORDINATOR_ADDRESS": "h", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "must be host:port"),
        ({"COORDINATOR_ADDRESS": "h:99999", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "must be host:port"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "0", "LOCAL_DEVICE_IDS": "0;1"},
         "comma-separated integers"),
    ],
)
def test_explicit_env_errors_name_the_variable(env, complaint):
    with pytest.raises(ClusterConfigError, match=complaint):
        detect_cluster(env)


def _slurm_step(**overrides):
    """An srun step's env on node 1 of gpu[07-08], one task per node, eight GPUs visible."""
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def test_slurm_one_process_per_node_uses_all_gpus():
    assert detect_cluster(_slurm_step()) == ClusterSpec("gpu07:21234", 2, 1, tuple(range(8)), "slurm")


def test_slurm_one_process_per_gpu_picks_local_id():
    env = _slurm_step(SLURM_STEP_NUM_TASKS="16", SLURM_NTASKS="16", SLURM_PROCID="11", SLURM_LOCALID="3",
                      SLURM_STEP_TASKS_PER_NODE="8(x2)")
    assert detect_cluster(env) == ClusterSpec("gpu07:21234", 16, 11, (3,), "slurm")


def test_slurm_gpus_split_between_tasks_and_physical_ids():
    env = _slurm_step(CUDA_VISIBLE_DEVICES=None, SLURM_STEP_GPUS="4,5,6,7", SLURM_STEP_TASKS_PER_NODE="2(x2)",
                      SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3", SLURM_LOCALID="1")
    assert detect_cluster(env).local_device_ids == (6, 7)


def test_slurm_bound_gpu_per_task_is_kept():
    env = _slurm_step(CUDA_VISIBLE_DEVICES="5", SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_STEP_NUM_TASKS="16",
                      SLURM_LOCALID="5")
    assert detect_cluster(env).local_device_ids == (0,)


def test_slurm_cpu_job_has_no_device_ids():
    env = _slurm_step(CUDA_VISIBLE_DEVICES=None, SLURM_STEP_NODELIST="vm", SLURM_STEP_TASKS_PER_NODE="2",
                      SLURM_NODEID="0", SLURM_LOCALID="1")
    assert detect_cluster(env) == ClusterSpec("vm:21234", 2, 1, None, "slurm")


def test_slurm_coordinator_port_and_address_overrides():
    assert detect_cluster(_slurm_step(COORDINATOR_PORT="4321")).coordinator_address == "gpu07:4321"
    assert detect_cluster(_slurm_step(COORDINATOR_ADDRESS="10.1.1.1:99")).coordinator_address == "10.1.1.1:99"


def test_derived_port_differs_per_job_and_stays_in_range():
    ports = {derive_port(job_id) for job_id in range(1000, 1100)}
    assert len(ports) == 100 and all(1024 < port < 65536 for port in ports)


def test_explicit_env_wins_over_slurm():
    env = _slurm_step(COORDINATOR_ADDRESS="127.0.0.1:5000", NUM_PROCESSES="3", PROCESS_ID="2")
    assert detect_cluster(env) == ClusterSpec("127.0.0.1:5000", 3, 2, None, "env")


def test_slurm_single_task_is_single_process():
    assert detect_cluster(_slurm_step(SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) is None


@pytest.mark.parametrize(
    "overrides, complaint",
    [
        ({"SLURM_STEP_NODELIST": None, "SLURM_STEP_NUM_TASKS": None}, "not in an srun step"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_TASKS": "4"},
         "3 visible GPUs cannot be split evenly among 2 tasks"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({"SLURM_NODEID": "5"}, "SLURM_NODEID=5 has no entry"),
        ({"SLURM_STEP_NODELIST": "gpu[07-"}, "unbalanced"),
        ({"COORDINATOR_PORT": "70000"}, "COORDINATOR_PORT=70000 must be in 1..65535"),
    ],
)
def test_slurm_errors(overrides, complaint):
    with pytest.raises(ClusterConfigError, match=complaint):
        detect_cluster(_slurm_step(**overrides))

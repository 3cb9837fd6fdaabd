"""Multi-process start-up (`initialize_distributed`) and the Slurm launcher behind `python -m automodel_jax.launch`."""

from automodel_jax.launcher.cluster import ClusterConfigError, ClusterSpec, detect_cluster, expand_nodelist
from automodel_jax.launcher.distributed import (
    DistributedInfo,
    DistributedInitError,
    describe_topology,
    initialize_distributed,
)
from automodel_jax.launcher.slurm import LaunchConfigError, SlurmError, SlurmJob, render_sbatch_script, submit

__all__ = [
    "ClusterConfigError",
    "ClusterSpec",
    "DistributedInfo",
    "DistributedInitError",
    "LaunchConfigError",
    "SlurmError",
    "SlurmJob",
    "describe_topology",
    "detect_cluster",
    "expand_nodelist",
    "initialize_distributed",
    "render_sbatch_script",
    "submit",
]

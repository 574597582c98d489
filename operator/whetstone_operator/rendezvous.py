"""The rendezvous of a FineTuneJob's pods: the one place that names the master, the port and the world.

PyTorchJob conventions: pods `<job>-node-<i>` behind a headless Service named after the job, so rank 0 is
reachable as `<job>-node-0.<job>`; `MASTER_*`, `WORLD_SIZE`, `NODE_RANK` for code that reads them and the
`PET_*` spellings, which are torchrun's flags as environment variables, so the container runs plain
`torchrun -m whetstone_trainer ...` without per-pod arguments.
"""

from __future__ import annotations

import hashlib

from whetstone_api.wire import MASTER_PORT

MAX_HOSTNAME = 63  # a pod's hostname is a DNS label


def pod_name(job: str, rank: int) -> str:
    return f"{job}-node-{rank}"


def hostname(job: str, rank: int) -> str:
    """The pod's hostname: its name when that is a valid DNS label, else the job name shortened with a digest
    of the whole name, so long job names (and many nodes) still give valid, distinct hostnames."""
    plain = pod_name(job, rank)
    if len(plain) <= MAX_HOSTNAME:
        return plain
    digest = hashlib.sha256(job.encode()).hexdigest()[:8]
    tail = f"-{digest}-node-{rank}"
    return job[: MAX_HOSTNAME - len(tail)].rstrip("-") + tail


def master_address(job: str) -> str:
    # The hostname.subdomain record of rank 0 in the headless Service named after the job.
    return f"{hostname(job, 0)}.{job}"


def processes_per_node(gpus_per_node: int) -> int:
    # One process per GPU; a CPU-only pod trains with one process.
    return max(gpus_per_node, 1)


def rendezvous_env(
    job: str, rank: int, nodes: int, gpus_per_node: int, port: int = MASTER_PORT
) -> list[dict[str, str]]:
    """The env of pod `rank`: torchrun reads the PET_* names, the rest is for code that expects them."""
    nproc = processes_per_node(gpus_per_node)
    values = {
        "MASTER_ADDR": master_address(job),
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nodes * nproc),
        "NODE_RANK": str(rank),
        "PET_MASTER_ADDR": master_address(job),
        "PET_MASTER_PORT": str(port),
        "PET_NNODES": str(nodes),
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": str(nproc),
    }
    return [{"name": k, "value": v} for k, v in values.items()]

"""The environment of ranks on other hosts: what is set only on the launching (login) host reaches every rank on every
host of a pdsh launch (launchers/incubate.sh --hostfile writes DS_ENV_FILE with dsincubate/launch_env.py), and each
rank picks the socket interfaces of gloo and NCCL towards MASTER_ADDR. Cluster tier: `make test-cluster`; reuses
the pipeline run of conftest.py's `cluster_run` (started with TORCH_EXTENSIONS_DIR, DSI_CLUSTER_PROBE and
CLUSTER_PROBE listed in DSI_FORWARD_ENV set on this machine only), so it adds no launch of its own.

On 56f30d4 DeepSpeed's pdsh runner forwarded from a host without GPU only PYTHON*, MLFLOW*, MV2*, UCX* and the
lines of .deepspeed_env: every remote rank ran without these variables (CUDA_HOME, TORCH_CUDA_ARCH_LIST, the kernel
build cache and OMP_NUM_THREADS alike).
"""
import json
import re

import pytest

pytestmark = pytest.mark.cluster

FULL = ("meta", "finetune", "e2e")
# what conftest.py's cluster_run sets on this host only (besides TORCH_EXTENSIONS_DIR=<shared>/torch_extensions)
PROBES = {"DSI_CLUSTER_PROBE": "dsi-prefixed", "CLUSTER_PROBE": "listed by the user"}


def ranks_of(root, phase):
    """Every rank's record of a phase: run.json's (taken after the process group exists) and ranks/rank_<r>.json."""
    run = json.loads((root / phase / "run.json").read_text())
    files = sorted((root / phase / "ranks").glob("rank_*.json"))
    return run["ranks"], [json.loads(f.read_text()) for f in files]


def phases():
    return [*FULL, *(f"incubate/module_{i}" for i in range(4))]


def test_a_variable_set_only_on_the_launching_host_is_seen_by_every_rank_on_every_host(cluster, shared, cluster_run):
    expected = dict(PROBES, TORCH_EXTENSIONS_DIR=str(shared / "torch_extensions"), OMP_NUM_THREADS="1")
    hosts = set()
    for phase in phases():
        gathered, files = ranks_of(cluster_run, phase)
        assert len(gathered) == len(files) >= 1, phase
        for rec in gathered + files:
            got = {k: rec.get("env", {}).get(k) for k in expected}
            assert got == expected, (phase, rec["host"], rec["rank"])
            hosts.add(rec["host"])
    assert hosts == set(cluster.names)  # all four hosts, none of them this machine


def test_the_launch_leaves_the_users_own_env_file_unchanged_and_keeps_its_lines(shared, cluster_run):
    # conftest.py's user file (DS_ENV_FILE): read and merged, never rewritten
    assert (shared / "ds_env").read_text() == "OMP_NUM_THREADS=1\n"
    written = (cluster_run / "logs" / "deepspeed_env").read_text().splitlines()
    assert "OMP_NUM_THREADS=1" in written and "CLUSTER_PROBE=listed by the user" in written


def test_each_rank_sets_nccl_and_gloo_interfaces_to_its_hosts_interface_towards_the_master(cluster, cluster_run):
    iface = {}
    for i, addr in enumerate(cluster.hosts):
        out = cluster.ssh(i, "ip -o -4 addr show").stdout
        iface[addr] = next(m.group(1) for m in re.finditer(r"^\d+:\s+(\S+)\s+inet\s+([\d.]+)/", out, re.M)
                           if m.group(2) == addr)
    for phase in FULL:  # world size 4 across the hosts (one-rank jobs need no interface)
        gathered, _ = ranks_of(cluster_run, phase)
        for rec in gathered:
            assert rec["env"]["NCCL_SOCKET_IFNAME"] == rec["env"]["GLOO_SOCKET_IFNAME"] == iface[rec["addr"]], rec

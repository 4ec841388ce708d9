"""Fixtures of the cluster tier: a cluster of 4 hosts (network namespaces with sshd, reached over ssh and pdsh; see
cluster.py), the debug pipeline run on it through `launchers/incubate.sh --hostfile`, and the same pipeline as 4
ranks on one host for comparison (run beside the first). Each is made once per session and read by every test that
needs it; the SLURM of test_slurm.py starts once, on this cluster. Run the tier with `make test-cluster` (or
`pytest -m cluster tests/cluster`); it needs root and installs Debian's openssh-server, pdsh (and slurm-wlm, munge
for the SLURM test) with apt-get when they are missing. When the cluster cannot be built the tests fail with the
reason; they are never skipped.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, ClusterUnavailable  # noqa: E402

from cluster_helpers import (LAUNCHERS, Started, demo_args, job_env, next_port, reuse_built_ops,  # noqa: E402
                             run_logged, tail)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        with Cluster(tmp_path_factory.mktemp("cluster"), n=4) as c:
            yield c
    except ClusterUnavailable as e:
        pytest.fail(f"cannot build the test cluster: {e}", pytrace=False)


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """A directory every host sees (this machine's file system), for run directories and the demo data."""
    d = tmp_path_factory.mktemp("shared")
    # what DeepSpeed's pdsh runner exports to every host (DS_ENV_FILE): one OpenMP thread per rank, as the 2-core
    # CI machine runs up to 4 ranks at once
    (d / "ds_env").write_text("OMP_NUM_THREADS=1\n")
    return d


@pytest.fixture(scope="session")
def one_host_launch(shared):
    """`one_host_run`'s pipeline, started and not waited for. cluster_run starts it beside its own launch: much of a
    pipeline's time is one process at a time (the launchers' checks, a runner starting its launcher, assembly,
    export), so the two pipelines share the 2 cores better than they use them one after the other; neither's
    result depends on the other (their own ports, run directories and logs)."""
    root = shared / "one_host_run"
    cmd = [str(LAUNCHERS / "incubate.sh"), "--cpu-ranks", "4", "--recipe", "debug", "--output", str(root),
           "--master_port", str(next_port()), "--", *demo_args(shared)]
    job = Started(cmd, shared / "one_host_run.log", job_env(None, shared), shared)
    yield job
    job.stop()  # the session ended before anything waited for it


@pytest.fixture(scope="session")
def cluster_run(cluster, shared, one_host_launch):
    """The debug pipeline on the 4 hosts: launchers/incubate.sh --hostfile (DeepSpeed's pdsh runner over ssh)."""
    root = shared / "cluster_run"
    cmd = [str(LAUNCHERS / "incubate.sh"), "--hostfile", str(cluster.hostfile), "--recipe", "debug",
           "--output", str(root), "--master_port", str(next_port()), "--", *demo_args(shared)]
    # set only on this (login) host: every rank on every host must see them (test_remote_env.py)
    login_only = dict(TORCH_EXTENSIONS_DIR=str(shared / "torch_extensions"), DSI_CLUSTER_PROBE="dsi-prefixed",
                      CLUSTER_PROBE="listed by the user", DSI_FORWARD_ENV="CLUSTER_PROBE")
    # a directory of its own (test_remote_env.py checks every rank got it), holding the DeepSpeed op the tier's earlier
    # launches compiled: loaded, not compiled again by every host (the first launch of the tier compiles it)
    reuse_built_ops(shared / "torch_extensions")
    rc, secs = run_logged(cmd, shared / "cluster_run.log", job_env(cluster, shared, **login_only), shared,
                          timeout=900)
    assert rc == 0, tail(shared / "cluster_run.log")
    return root


@pytest.fixture(scope="session")
def one_host_run(shared, one_host_launch):
    """The same pipeline as 4 CPU ranks on this one host (meta, fine-tune, E2E at world size 4; the 4 incubation
    jobs concurrently with one rank each, as on the cluster), once it has finished."""
    rc, _ = one_host_launch.wait(timeout=1800)  # from its start, beside cluster_run and the tests after it
    assert rc == 0, tail(shared / "one_host_run.log")
    return shared / "one_host_run"

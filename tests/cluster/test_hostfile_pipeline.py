"""The Deep Incubation pipeline across 4 hosts through `launchers/incubate.sh --hostfile` and DeepSpeed's pdsh runner:
where every rank ran, that the K incubation jobs ran on their own hosts at the same time, and that the result is the
same as on one host. Cluster tier: `make test-cluster` (see conftest.py for the cluster)."""
import json

import pytest
import torch

from dsincubate import checkpoint as ckpt

pytestmark = pytest.mark.cluster

PHASE_DIRS = ["meta", "finetune", "e2e"] + [f"incubate/module_{i}" for i in range(4)]


def record(root, d):
    return json.loads((root / d / "run.json").read_text())


def test_full_allocation_phases_run_one_rank_on_each_of_the_four_hosts(cluster, cluster_run):
    for d in ("meta", "finetune", "e2e"):
        run = record(cluster_run, d)
        assert run["world_size"] == 4
        # the address each rank reaches the master from is its own host's, and so is its host name
        assert [r["addr"] for r in run["ranks"]] == cluster.hosts, d
        assert [r["host"] for r in run["ranks"]] == cluster.names, d
        assert [r["rank"] for r in run["ranks"]] == [0, 1, 2, 3]


def test_each_incubation_job_ran_on_its_own_host_and_the_jobs_overlapped_in_time(cluster, cluster_run):
    runs = [record(cluster_run, f"incubate/module_{i}") for i in range(4)]
    for i, run in enumerate(runs):
        # a one-host job (--include <host>) must run on that host, not on the machine that launched it
        assert run["world_size"] == 1
        assert [(r["host"], r["addr"]) for r in run["ranks"]] == [(cluster.names[i], cluster.hosts[i])], i
        rank_file = json.loads((cluster_run / f"incubate/module_{i}/ranks/rank_0.json").read_text())
        assert rank_file["addr"] == cluster.hosts[i] and rank_file["master_addr"] == cluster.hosts[i]
    # concurrent: every job's process was launched before any job finished (run one after another, job i+1's
    # process could not start before job i's ended). Launch times, not training intervals: on a loaded 2-core machine
    # one job's imports can outlast another's whole training (CI saw a 0.16 s gap between the intervals).
    assert max(r["process_started_at"] for r in runs) < min(r["finished_at"] for r in runs)
    log = (cluster_run.parent / "cluster_run.log").read_text()
    assert "incubating 4 modules concurrently" in log


def test_four_host_pipeline_equals_the_same_pipeline_as_four_ranks_on_one_host(cluster_run, one_host_run):
    summary = json.loads((cluster_run / "summary.json").read_text())
    local = json.loads((one_host_run / "summary.json").read_text())
    assert summary["deep_incubation"]["top1"] == local["deep_incubation"]["top1"]
    assert summary["e2e"]["top1"] == local["e2e"]["top1"]
    for d in PHASE_DIRS:
        assert record(cluster_run, d)["final"]["top1"] == record(one_host_run, d)["final"]["top1"], d
        assert record(one_host_run, d)["world_size"] == record(cluster_run, d)["world_size"], d
    # same ranks, same collectives (gloo over TCP between hosts, shared memory on one host): the same weights
    for f in ("finetune/model.safetensors", "e2e/model.safetensors"):
        a, _ = ckpt.load_tensors(cluster_run / f)
        b, _ = ckpt.load_tensors(one_host_run / f)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f


def test_rank_zero_logs_progress_lines_with_host_and_rank_not_progress_bar_frames(cluster_run):
    log = (cluster_run.parent / "cluster_run.log").read_text()
    assert "\r" not in log  # no progress-bar frames in a log that is not a terminal
    lines = [ln for ln in log.splitlines() if "[dsincubate] finetune epoch 1/1 step" in ln]
    assert lines and all("[h0 rank 0/4]" in ln and "img/s" in ln and "ETA" in ln and "loss" in ln
                         for ln in lines), lines

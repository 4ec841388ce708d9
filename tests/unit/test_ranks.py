"""dsincubate/ranks.py: SLURM node lists, the per-node DeepSpeed launch of a one-task-per-node step (ranks, GPUs as
SLURM bound them) and the refusal of a one-rank world when SLURM/MPI/PMI say the world is larger (dist.init).
Unit tier: `.venv/bin/python -m pytest -q tests/unit/test_ranks.py`."""
import base64
import json

import pytest

from dsincubate import dist, ranks
from dsincubate.errors import UserError


@pytest.mark.parametrize("spec,names", [
    ("node07", ["node07"]),
    ("h[0-1]", ["h0", "h1"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-11],login1", ["gpu8", "gpu9", "gpu10", "gpu11", "login1"]),
    ("a[1-2]-ib[3,5]", ["a1-ib3", "a1-ib5", "a2-ib3", "a2-ib5"]),
    ("r1n[098-101]", ["r1n098", "r1n099", "r1n100", "r1n101"]),
])
def test_node_lists_expand_like_scontrol_show_hostnames(spec, names):
    assert ranks.expand_nodelist(spec) == names


@pytest.mark.parametrize("spec", ["node[01-03", "node[a-b]"])
def test_a_malformed_node_list_is_a_user_error(spec):
    with pytest.raises(UserError):
        ranks.expand_nodelist(spec)


def _step(node: str, nodelist: str = "gpu[01-03,07]", **extra) -> dict:
    nodes = ranks.expand_nodelist(nodelist)
    env = {"SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": nodelist,
           "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NUM_TASKS": str(len(nodes)), "SLURM_NTASKS": str(len(nodes)),
           "SLURMD_NODENAME": node, "SLURM_NODEID": str(nodes.index(node)), "SLURM_PROCID": str(nodes.index(node))}
    env.update(extra)
    return env


def _ranks_of(info: dict, node_rank: int) -> list[int]:
    """The global ranks DeepSpeed's launch gives the ranks of node `node_rank` (its own rule: node order, then slot)."""
    before = sum(len(v) for v in list(info.values())[:node_rank])
    return list(range(before, before + len(list(info.values())[node_rank])))


def test_each_node_of_a_four_node_step_gets_its_own_ranks_of_one_world_with_the_first_node_as_master():
    seen = []
    for node in ("gpu01", "gpu02", "gpu03", "gpu07"):
        info, node_rank, master = ranks.world_info(_step(node), ranks_per_node=2)
        assert list(info) == ["gpu01", "gpu02", "gpu03", "gpu07"] and master == "gpu01"
        assert all(len(v) == 2 for v in info.values())
        seen += _ranks_of(info, node_rank)
    assert seen == list(range(8))  # several ranks per node, every rank exactly once


def test_the_node_rank_follows_the_node_name_not_the_task_order():
    info, node_rank, _ = ranks.world_info(_step("gpu03", SLURM_NODEID="0"), ranks_per_node=1)
    assert node_rank == 2


def test_the_gpus_slurm_bound_to_the_node_are_used_as_they_are():
    # the second job on a node got GPUs 4-7 (no cgroup device constraint: physical ids in CUDA_VISIBLE_DEVICES)
    info, node_rank, _ = ranks.world_info(_step("gpu02", CUDA_VISIBLE_DEVICES="4,5,6,7"), ranks_per_node=None)
    assert info["gpu02"] == ["4", "5", "6", "7"] and node_rank == 1
    assert info["gpu01"] == [0, 1, 2, 3]  # other nodes only count
    # fewer ranks than bound GPUs: the first ones; more: refused
    info, _, _ = ranks.world_info(_step("gpu01", CUDA_VISIBLE_DEVICES="2,3"), ranks_per_node=1)
    assert info["gpu01"] == ["2"]
    with pytest.raises(UserError, match="bound 2 GPU"):
        ranks.world_info(_step("gpu01", CUDA_VISIBLE_DEVICES="2,3"), ranks_per_node=4)
    # no CUDA_VISIBLE_DEVICES but SLURM's own variable
    info, _, _ = ranks.world_info(_step("gpu01", SLURM_STEP_GPUS="6"), ranks_per_node=None)
    assert info["gpu01"] == ["6"]


def test_cpu_ranks_need_a_rank_count_and_a_step_of_one_task_per_node():
    info, _, _ = ranks.world_info(_step("gpu01"), ranks_per_node=3)
    assert info["gpu01"] == [0, 1, 2]
    with pytest.raises(UserError, match="--ranks-per-node"):
        ranks.world_info(_step("gpu01"), ranks_per_node=None)
    with pytest.raises(UserError, match="one SLURM task per node"):
        ranks.world_info(_step("gpu01", SLURM_STEP_NUM_TASKS="8"), ranks_per_node=2)
    with pytest.raises(UserError, match="SLURM step"):
        ranks.world_info({}, ranks_per_node=2)


def test_the_launch_command_is_deepspeeds_per_node_launcher_with_this_nodes_rank():
    cmd = ranks.launch_command(_step("gpu03", CUDA_VISIBLE_DEVICES="1"), None, 29611, ["meta", "--recipe", "debug"],
                               python="/py")
    assert cmd[:4] == ["/py", "-u", "-m", "deepspeed.launcher.launch"]
    assert "--node_rank=2" in cmd and "--master_addr=gpu01" in cmd and "--master_port=29611" in cmd
    assert cmd[-5:] == ["--module", "dsincubate", "meta", "--recipe", "debug"]
    b64 = next(a.split("=", 1)[1] for a in cmd if a.startswith("--world_info="))
    info = json.loads(base64.urlsafe_b64decode(b64))
    assert info == {"gpu01": [0], "gpu02": [0], "gpu03": ["1"], "gpu07": [0]}


@pytest.mark.parametrize("env,says", [
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "9"}, "task 1 of 2"),
    ({"SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}, "of 4"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"PMI_SIZE": "8"}, "PMI"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2"),
])
def test_a_process_of_a_larger_world_without_rank_variables_is_refused(env, says):
    with pytest.raises(UserError, match=says):
        ranks.check_world(env)


@pytest.mark.parametrize("env", [
    {},  # a plain process: a one-rank world
    {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"},  # a batch script of a 2-task job (no step): one process
    {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"},  # srun -n 1
    {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"},  # a rank a launcher started
    {"WORLD_SIZE": "1", "PMI_SIZE": "1"},
])
def test_a_single_process_or_a_launched_rank_is_not_refused(env):
    ranks.check_world(env)


def test_dist_init_refuses_a_two_task_slurm_step_without_rank_variables(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(UserError, match="rank 0 of 1"):
        dist.init()
    assert "RANK" not in __import__("os").environ  # nothing was set up


def test_the_ranks_of_a_node_task_split_its_cores_for_their_loader_workers(monkeypatch):
    """A node task of 64 cores (SLURM_CPUS_PER_TASK=64) running 8 ranks: each rank's loader gets 64/8 - 1 workers,
    not 63 (the task's cores are not passed on as if they were each rank's)."""
    from dsincubate.data.loader import default_workers

    monkeypatch.delenv("DSI_NODE_TASK_CPUS", raising=False)  # so that what main sets is undone after the test
    for k, v in _step("gpu01", SLURM_CPUS_PER_TASK="64", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7").items():
        monkeypatch.setenv(k, v)
    started = {}

    def execv(path, cmd):  # where main hands over to DeepSpeed's launcher: record what it would start, with what
        started.update(cmd=cmd, env=dict(__import__("os").environ))
        raise SystemExit(0)

    monkeypatch.setattr(ranks.os, "execv", execv)
    with pytest.raises(SystemExit):
        ranks.main(["--master_port", "29700", "--", "meta", "--recipe", "debug"])
    assert "deepspeed.launcher.launch" in started["cmd"] and "--node_rank=0" in started["cmd"]
    env = started["env"]
    assert "SLURM_CPUS_PER_TASK" not in env and env["DSI_NODE_TASK_CPUS"] == "64"
    rank_env = dict(env, LOCAL_SIZE="8", RANK="3", LOCAL_RANK="3")  # what DeepSpeed's launch adds per rank
    assert default_workers(rank_env, affinity=64) == 7


def test_cli_refuses_a_two_task_slurm_step_before_writing_anything(monkeypatch, tmp_path, capsys):
    """`srun -n 2 python -m dsincubate meta ...`: one error line, exit 2, and no demo data, rank record or output."""
    from dsincubate import cli

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    out = tmp_path / "run"
    rc = cli.main(["meta", "--recipe", "debug", "--output", str(out), "--set", f"data.demo_root={tmp_path / 'demo'}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank 0 of 1" in err[0]
    assert not (tmp_path / "demo").exists() and not (out / "meta").exists()

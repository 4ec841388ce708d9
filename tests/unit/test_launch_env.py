"""The environment file the launchers hand DeepSpeed's pdsh runner (DS_ENV_FILE, dsincubate/launch_env.py): what the
ranks on the other hosts need, merged with the user's own `.deepspeed_env`, which is never changed. Unit tier:
`pytest tests/unit/test_launch_env.py -q`. (That every rank on every host sees it: tests/cluster/test_remote_env.py.)
"""
import pytest

from dsincubate.errors import UserError
from dsincubate.launch_env import (FORWARDED_LIST, parse_env_file, rank_env, remote_env, split_names,
                                   user_env_files, write_env_file)


def read(path):
    return parse_env_file(path.read_text(), str(path))


def test_the_variables_ranks_read_are_forwarded_and_per_host_ones_are_not(tmp_path):
    environ = {"CUDA_HOME": "/opt/cuda-12.4", "TORCH_EXTENSIONS_DIR": "/shared/ext", "TORCH_CUDA_ARCH_LIST": "8.0 9.0",
               "OMP_NUM_THREADS": "4", "DSI_OPS_CACHE": "/shared/ops", "NCCL_IB_HCA": "mlx5_0", "HOME": "/root",
               "CUDA_VISIBLE_DEVICES": "4,5", "RANK": "0", "MASTER_ADDR": "10.0.0.1", "PATH": "/usr/bin",
               "SLURM_JOB_ID": "7", "DS_ENV_FILE": str(tmp_path / "none"), "LD_LIBRARY_PATH": "/login/lib"}
    env = write_env_file(tmp_path / "out" / "ds_env", environ, [], cwd=str(tmp_path), home=str(tmp_path))
    assert read(tmp_path / "out" / "ds_env") == env
    assert {k: v for k, v in env.items() if k != FORWARDED_LIST} == {
        "CUDA_HOME": "/opt/cuda-12.4", "TORCH_EXTENSIONS_DIR": "/shared/ext", "TORCH_CUDA_ARCH_LIST": "8.0 9.0",
        "OMP_NUM_THREADS": "4", "DSI_OPS_CACHE": "/shared/ops", "NCCL_IB_HCA": "mlx5_0"}
    assert env[FORWARDED_LIST].split(",") == sorted(k for k in env if k != FORWARDED_LIST)


def test_deepspeeds_own_exclusion_holds_where_nodes_set_their_ib_devices_themselves():
    env, _ = remote_env({"AISC_JOB_NAME": "j", "NCCL_IB_HCA": "mlx5_0", "NCCL_DEBUG": "INFO"}, [], [])
    assert "NCCL_IB_HCA" not in env and env["NCCL_DEBUG"] == "INFO"


def test_names_the_user_lists_are_forwarded_and_must_be_set(tmp_path):
    environ = {"WANDB_PROJECT": "vit", "HF_HOME": "/shared/hf"}
    names = split_names(["WANDB_PROJECT, HF_HOME", ""])
    env, _ = remote_env(environ, names, [])
    assert env["WANDB_PROJECT"] == "vit" and env["HF_HOME"] == "/shared/hf"
    with pytest.raises(UserError, match="MISSING is not set"):
        remote_env(environ, ["MISSING"], [])


@pytest.mark.parametrize("names, match", [(["RANK"], "set per host"), (["CUDA_VISIBLE_DEVICES"], "set per host"),
                                          (["1BAD"], "not a variable name"), (["A-B"], "not a variable name")])
def test_a_bad_name_is_refused(names, match):
    with pytest.raises(UserError, match=match):
        split_names(names)


def test_a_value_the_remote_shell_would_change_is_refused_when_listed_and_skipped_when_automatic():
    with pytest.raises(UserError, match="remote shell"):
        remote_env({"TOKEN": "a$b"}, ["TOKEN"], [])
    env, warnings = remote_env({"CUDA_HOME": 'x"y', "OMP_NUM_THREADS": "2"}, [], [])
    assert "CUDA_HOME" not in env and env["OMP_NUM_THREADS"] == "2" and "CUDA_HOME" in warnings[0]


def test_the_users_deepspeed_env_files_are_merged_in_deepspeeds_order_and_left_unchanged(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nCUDA_HOME=/remote/cuda\nFROM_HOME=1\n")
    (cwd / ".deepspeed_env").write_text("\n# the run's settings\nFROM_HOME=2\nLD_PRELOAD=/x.so\n")
    before = {p: p.read_text() for p in (home / ".deepspeed_env", cwd / ".deepspeed_env")}
    environ = {"CUDA_HOME": "/login/cuda", "OMP_NUM_THREADS": "1", "MINE": "m"}
    env = write_env_file(tmp_path / "run" / "ds_env", environ, ["MINE"], cwd=str(cwd), home=str(home))
    # the user's files win over this host's values (they are written for the other hosts); the working directory's
    # over the home directory's (DeepSpeed's order); listed names over both
    assert env["CUDA_HOME"] == "/remote/cuda" and env["FROM_HOME"] == "2" and env["NCCL_DEBUG"] == "INFO"
    assert env["LD_PRELOAD"] == "/x.so" and env["OMP_NUM_THREADS"] == "1" and env["MINE"] == "m"
    assert {p: p.read_text() for p in before} == before


def test_ds_env_file_set_by_the_user_names_the_file_to_merge(tmp_path):
    own = tmp_path / "my_env"
    own.write_text("OMP_NUM_THREADS=1\n")
    assert user_env_files({"DS_ENV_FILE": str(own)}, str(tmp_path), str(tmp_path / "nohome")) == [own]
    env = write_env_file(tmp_path / "ds_env", {"DS_ENV_FILE": str(own), "OMP_NUM_THREADS": "8"}, [],
                         cwd=str(tmp_path), home=str(tmp_path / "nohome"))
    assert env["OMP_NUM_THREADS"] == "1" and "DS_ENV_FILE" not in env


def test_rewriting_the_runs_own_file_does_not_merge_its_stale_content(tmp_path):
    out = tmp_path / "ds_env"
    write_env_file(out, {"DS_ENV_FILE": str(out), "DSI_A": "1"}, [], cwd=str(tmp_path), home=str(tmp_path))
    env = write_env_file(out, {"DS_ENV_FILE": str(out)}, [], cwd=str(tmp_path), home=str(tmp_path))
    assert "DSI_A" not in env


def test_a_line_deepspeed_cannot_parse_is_one_error_naming_the_file_and_line(tmp_path):
    bad = tmp_path / ".deepspeed_env"
    bad.write_text("A=1\nexport B\n")
    with pytest.raises(UserError, match=r"\.deepspeed_env:2: not a NAME=VALUE line"):
        remote_env({}, [], [bad])


def test_each_rank_records_what_it_received_of_the_forwarded_variables():
    got = rank_env({FORWARDED_LIST: "CUDA_HOME,WANDB_PROJECT", "CUDA_HOME": "/c", "WANDB_PROJECT": "p"})
    assert got["CUDA_HOME"] == "/c" and got["WANDB_PROJECT"] == "p" and got["OMP_NUM_THREADS"] is None

"""The launchers refuse bad options with one error line and exit 2 before anything starts: no deepspeed job, no run
directory. Integration tier (runs the bash launchers).

    pytest tests/integration/test_launcher_args.py -q
"""
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
LAUNCHERS = Path(__file__).resolve().parents[2] / "launchers"

CASES = [
    (["incubate.sh", "--cpu-ranks", "0"], "incubate.sh: error: --cpu-ranks must be a positive integer (got '0')"),
    (["incubate.sh", "--cpu-ranks", "two"], "--cpu-ranks must be a positive integer (got 'two')"),
    (["incubate.sh", "--cpu-ranks"], "--cpu-ranks needs a value"),
    (["incubate.sh", "--num_gpus", "-1"], "--num_gpus must be a positive integer"),
    (["incubate.sh", "--num_nodes", "1.5"], "--num_nodes must be a positive integer"),
    (["incubate.sh", "--master_port", "65500"], "use a port <= 65000"),
    (["incubate.sh", "--output"], "--output needs a value"),
    (["incubate.sh", "--hostfile", "{tmp}/nohosts"], "hostfile {tmp}/nohosts not found"),
    (["incubate.sh", "--bogus"], "unknown option --bogus"),
    (["phase.sh", "train"], "first argument must be a training phase"),
    (["incubate.sh", "--env"], "--env needs a value"),
    (["incubate.sh", "--env", "1BAD"], "launch_env: error: --env / DSI_FORWARD_ENV: '1BAD' is not a variable name"),
    (["incubate.sh", "--env", "CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES is set per host by DeepSpeed's launcher"),
    (["incubate.sh", "--env", "DSI_SURELY_UNSET_VAR"], "DSI_SURELY_UNSET_VAR is not set on this host"),
    (["phase.sh", "meta", "--env"], "phase.sh: error: --env needs a value"),
    (["phase.sh", "meta", "--hostfile", "{tmp}/hosts", "--env", "RANK"], "RANK is set per host"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_launcher_option_is_one_error_line_and_exit_2_before_anything_starts(tmp_path, args, message):
    script, *rest = args
    rest = [a.replace("{tmp}", str(tmp_path)) for a in rest]
    out = [] if "--output" in rest or script != "incubate.sh" else ["--output", str(tmp_path / "run")]
    p = subprocess.run(["bash", str(LAUNCHERS / script), *out, *rest],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message.replace("{tmp}", str(tmp_path)) in lines[0], p.stderr
    assert not (tmp_path / "run").exists() and p.stdout == ""


def test_phase_sh_takes_its_phases_from_the_registry(tmp_path):
    """phase.sh keeps no list of its own: its refusal names exactly the registry's phases."""
    from dsincubate import registry

    p = subprocess.run(["bash", str(LAUNCHERS / "phase.sh"), "bogus"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"phase.sh: error: first argument must be a training phase: {', '.join(registry.list_phases())} "
        "(got 'bogus')")
    assert "m2mkd_finetune|" not in (LAUNCHERS / "phase.sh").read_text()


def test_the_gpu_map_cli_prints_an_empty_allocation_without_gpu_and_refuses_zero_jobs():
    import os
    import sys

    cli = [sys.executable, "-m", "dsincubate.launch_env", "gpus"]
    p = subprocess.run([*cli, "--jobs", "4"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 0 and p.stdout == "\n", p.stderr
    p = subprocess.run([*cli, "--jobs", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "launch_env: error: --jobs must be >= 1 (got 0)"


def test_a_hostfile_phase_writes_the_remote_environment_before_deepspeed_starts(tmp_path):
    """phase.sh --hostfile: DS_ENV_FILE for DeepSpeed's pdsh runner in the run's logs, with the --env names and the
    variables ranks read; the user's own .deepspeed_env (in the working directory) is merged and left unchanged.
    DeepSpeed itself then stops on the unreachable host (no ssh in this tier): the file is what is checked here."""
    import os

    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n")
    (tmp_path / "hosts").write_text("nohost.invalid slots=1\n")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", WANDB_PROJECT="vit", HOME=str(tmp_path / "home"))
    p = subprocess.run(["bash", str(LAUNCHERS / "phase.sh"), "meta", "--hostfile", str(tmp_path / "hosts"),
                        "--env", "WANDB_PROJECT", "--", "--recipe", "debug", "--output", str(tmp_path / "run")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0  # nohost.invalid
    lines = (tmp_path / "run" / "logs" / "deepspeed_env_meta").read_text().splitlines()
    assert {"TORCH_CUDA_ARCH_LIST=9.0", "WANDB_PROJECT=vit", "NCCL_DEBUG=WARN"} <= set(lines), lines
    assert (tmp_path / ".deepspeed_env").read_text() == "NCCL_DEBUG=WARN\n"

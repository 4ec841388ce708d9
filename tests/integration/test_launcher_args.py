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


def test_phase_sh_accepts_every_training_phase_of_the_cli():
    from dsincubate.cli import TRAIN_PHASES

    text = (LAUNCHERS / "phase.sh").read_text()
    case_line = next(ln for ln in text.splitlines() if ln.strip().startswith("meta|"))
    assert set(case_line.strip().split(")")[0].split("|")) == set(TRAIN_PHASES)

"""Plan once: a phase's run is planned (ds_config resolved, output checked, steps counted) once, by the CLI's checks,
and the run executes that plan (on b0a3766 each ran four times: the CLI's check_plan and preflight, the trainer's
prepare and its check_plan). A tiny E2E phase is trained in a child process (its own process group) that counts the
calls, and that building the engine sets nothing on the phase (the objective gets the model as an argument).
Integration tier (it trains).

    pytest tests/integration/test_plan_once.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.img_size=16",
         "model.patch_size=8", "model.kernel_backend=torch", "e2e.epochs=1", "data.samples_per_epoch=32",
         "e2e.micro_batch=8", "e2e.eval_every=100"]
CHILD = """
import json, sys
from dsincubate import checks, cli, trainer
calls = {"resolve_ds_config": 0, "check_output": 0}
def counted(module, name):
    real = getattr(module, name)
    def wrapper(*a, **k):
        calls[name] += 1
        return real(*a, **k)
    return wrapper
for module in (checks, trainer):  # wherever a name is looked up (trainer imported them by name before)
    for name in calls:
        if hasattr(module, name):
            setattr(module, name, counted(module, name))
set_by_engine = []  # attributes of the phase that building its engine added or replaced
real_build = trainer.build_engine
def build_engine(phase, *a, **k):
    before = dict(vars(phase))
    built = real_build(phase, *a, **k)
    after = vars(phase)
    set_by_engine.extend(sorted(n for n in after if n not in before or after[n] is not before[n]))
    return built
trainer.build_engine = build_engine
rc = cli.main(sys.argv[1:])
print(json.dumps(dict(calls, rc=rc, set_by_engine=set_by_engine)))
"""


def _count(tmp_path, *extra):
    args = ["e2e", "--recipe", "debug", "--output", str(tmp_path / "run"),
            "--set", f"data.demo_root={tmp_path / 'demo'}", *sum((["--set", s] for s in SMALL), []), *extra]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_phase_run_resolves_its_ds_config_and_checks_its_output_once(tmp_path):
    got = _count(tmp_path)
    # and the engine leaves nothing on the phase (on 2fa0a8a it set phase.model, which `objective` read)
    assert got == {"resolve_ds_config": 1, "check_output": 1, "rc": 0, "set_by_engine": []}
    assert json.loads((tmp_path / "run" / "e2e" / "run.json").read_text())["final"]["top1"] is not None


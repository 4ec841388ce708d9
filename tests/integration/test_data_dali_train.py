"""data.backend=dali in a real training run: `dsincubate e2e` runs the debug recipe's e2e phase on the demo shards
through DALI (CPU operators), one-pass epochs, and a run stopped after its first epoch and resumed ends with the same
weights as the run that never stopped. One rank (the 2-rank split is tests/unit/test_data_dali.py's; a 2-rank
launch costs ~100 s here, three of them too much of CI's budget). Integration tier; skipped without DALI.

    pytest -m integration tests/integration/test_data_dali_train.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsincubate import checkpoint as ckpt
from dsincubate.data.dali import dali_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed (pip install -e .[dali])")]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _launch(tmp_path, out, *extra):
    cmd = [sys.executable, "-m", "dsincubate", "e2e", "--recipe", "debug", "--output", str(out), "--set", f"data.demo_root={tmp_path / 'demo'}",
           "--set", "e2e.epochs=2", "--set", "data.backend=dali", "--set", "data.resampled=false"]
    for s in extra:
        cmd += ["--set", s]
    p = subprocess.run(cmd, cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(Path(__file__).resolve().parents[2])), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_debug_recipe_trains_on_dali_and_resumes_to_the_same_weights(tmp_path):
    _launch(tmp_path, tmp_path / "a")
    for _ in range(2):  # stopped after each epoch, resumed by the same command
        _launch(tmp_path, tmp_path / "b", "stop_after_epochs=1")
    a, _ = ckpt.load_tensors(tmp_path / "a" / "e2e" / "model.safetensors")
    b, _ = ckpt.load_tensors(tmp_path / "b" / "e2e" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "a" / "e2e" / "run.json").read_text())
    assert run["world_size"] == 1 and run["config"]["data"]["backend"] == "dali"
    stats = run["data"]["stats"]
    assert stats and all(s["backend"] == "dali" and s["mode"] == "one_pass" and s["bad_samples"] == 0
                         for s in stats)
    assert all(h["train_loss"] > 0 and 0 <= h["top1"] <= 100 for h in run["history"])
    # DALI's index files were written beside the demo shards when the demo was generated
    assert list((tmp_path / "demo").rglob("*.idx"))

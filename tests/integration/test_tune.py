"""`dsincubate tune` end to end on the CPU: each trial in its own subprocess, one that does not fit under the memory
cap is reported as a row (not a crash of the sweep), and the fastest one that fitted is written as a valid ds_config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsincubate import dsconfig

pytestmark = pytest.mark.integration


def test_tune_survives_a_config_that_does_not_fit(tmp_path):
    out = tmp_path / "best.json"
    cmd = [sys.executable, "-m", "dsincubate.tune", "--recipe", "debug", "--phase", "incubate", "--module", "1",
           "--micro-batches", "8,4096", "--ds-configs", "cpu", "--grad-checkpointing", "off", "--steps", "1",
           "--warmup", "0", "--memory-cap", "1G", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    trials = json.loads((tmp_path / "best.trials.json").read_text())
    rows = {r["micro_batch"]: r for r in trials["trials"]}
    assert rows[8]["ok"] and rows[8]["images_per_second"] > 0 and rows[8]["peak_bytes_per_rank"] > 0
    assert not rows[4096]["ok"] and rows[4096]["error"] == "out of memory"
    assert trials["best"]["micro_batch"] == 8 and "incubate.micro_batch=8" in trials["use"]
    best = json.loads(out.read_text())
    dsconfig.validate(best, str(out))  # engine keys only
    assert not set(best) & set(dsconfig.RECIPE_KEYS)
    assert "out of memory" in p.stdout

"""Integration tests of the Vision-MoE and of m2mKD as a pipeline method, through the real `deepspeed` launcher and
`launchers/incubate.sh` on the CPU: a V-MoE trains with 2 ranks, ZeRO-2 and experts spread over both ranks (expert
parallelism, all-to-all over gloo), resumes to the same weights, saves DeepSpeed's per-expert checkpoint files and
exports every expert; m2mKD's K student jobs run concurrently like incubation's, then assemble, fine-tune and export.
Integration tier."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsincubate import checkpoint as ckpt
from dsincubate.evaluate import model_from_file
from dsincubate.models import moe, vit

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
VMOE = ["model.moe_every=2", "model.moe_experts=4", "model.moe_ep_size=2"]  # = tests/conftest.py VMOE_SETS


def _launch(tmp_path, demo_root, out, *extra, port):
    """The same command as the session's `vmoe_run` (tests/conftest.py), with `extra` settings."""
    ds = Path(sys.executable).parent / "deepspeed"
    cmd = [str(ds), "--num_accelerators", "2", "--master_port", str(port), "--module", "dsincubate", "e2e",
           "--recipe", "debug", "--ds-config", "zero2_bf16", "--output", str(out),
           "--set", f"data.demo_root={demo_root}", "--set", "e2e.epochs=2"]
    for s in VMOE + list(extra):
        cmd += ["--set", s]
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_vmoe_trains_on_two_expert_parallel_ranks_with_zero2_resumes_exactly_and_exports_every_expert(tmp_path,
                                                                                                       demo_root,
                                                                                                       vmoe_run):
    # the uninterrupted run is the session's (tests/conftest.py), also inspected by test_shutdown.py
    assert vmoe_run.returncode == 0, vmoe_run.text[-3000:]
    a_root = vmoe_run.out
    for _ in range(2):  # stopped after each epoch, resumed by the same command
        _launch(tmp_path, demo_root, tmp_path / "b", "stop_after_epochs=1", port=29582)
    a, _ = ckpt.load_tensors(a_root / "e2e" / "model.safetensors")
    b, _ = ckpt.load_tensors(tmp_path / "b" / "e2e" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((a_root / "e2e" / "run.json").read_text())
    assert run["world_size"] == 2 and run["ds_config"]["zero_optimization"]["stage"] == 2
    # the load-balancing loss is logged per epoch (run.json, metrics.jsonl and TensorBoard), apart from the total
    assert all(h["train_moe_aux"] > 0 and h["train_loss"] > 0 for h in run["history"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(a_root / "e2e" / "tb"))
    tb.Reload()
    assert len(tb.Scalars("epoch/train_moe_aux")) == 2
    # DeepSpeed's checkpoint holds each expert of each MoE layer in its own file
    tag = sorted((a_root / "e2e" / "checkpoints").glob("epoch*"))[-1]
    assert {p.name for p in tag.glob("layer_*_expert_*_model_states.pt")} == {
        f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(4)}
    # the file holds all 4 experts of both layers (2 from each rank), trained apart
    for layer in ("stages.1.blocks.0", "stages.3.blocks.0"):
        w = [a[f"{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"] for e in range(4)]
        assert all(not torch.equal(w[i], w[j]) for i in range(4) for j in range(i + 1, 4))
    # export: every expert, and a model.json whose spec rebuilds the V-MoE with the trained outputs
    p = subprocess.run([sys.executable, "-m", "dsincubate", "export", "--source", "e2e", "--recipe", "debug",
                        "--output", str(a_root), *sum((["--set", s] for s in VMOE), [])],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    exp = a_root / "export" / "e2e"
    info = json.loads((exp / "model.json").read_text())
    model = vit.build(vit.ModelSpec.from_json(info["spec"]))
    tensors, _ = ckpt.load_tensors(exp / "model.safetensors")
    model.load_state_dict(tensors, strict=True)
    assert sum(moe.is_expert_key(k) for k in tensors) == 2 * 4 * 4  # 2 layers x 4 experts x (2 weights + 2 biases)
    ref = model_from_file(a_root / "e2e" / "model.safetensors").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))


def test_m2mkd_pipeline_method_runs_its_student_jobs_concurrently_through_the_launcher(tmp_path, demo_root):
    """incubate.sh --methods e2e,m2mkd --cpu-ranks 2 with K = 2: the E2E teacher, the meta model, the 2 V-MoE student
    jobs concurrently (one CPU rank each: their runs overlap in time), assembly, the students' fine-tune, export, and
    the m2mKD row of the summary."""
    out = tmp_path / "kd"
    cmd = ["bash", str(REPO / "launchers" / "incubate.sh"), "--recipe", "debug", "--methods", "e2e,m2mkd",
           "--cpu-ranks", "2", "--master_port", "29591", "--output", str(out), "--",
           "--set", f"data.demo_root={demo_root}", "--set", "model.moe_every=2", "--set", "model.moe_experts=4",
           "--set", "model.num_stages=2"]
    p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "m2mKD: distilling 2 modules concurrently" in p.stdout
    spans = []
    for i in range(2):
        run = json.loads((out / "m2mkd" / f"module_{i}" / "run.json").read_text())
        assert run["frozen_params"]["sha256_before"] == run["frozen_params"]["sha256_after"] is not None
        assert all({"train_ce", "train_kd", "train_moe_aux"} <= set(h) for h in run["history"])  # the loss's terms
        spans.append((run["process_started_at"], run["finished_at"]))
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # both launched before either finished
    assert ckpt.complete(out / "m2mkd" / "assemble") and ckpt.complete(out / "m2mkd" / "finetune")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["m2mkd"]["top1"] is not None and summary["m2mkd"]["device_hours"] > 0
    assert "moe" in json.loads((out / "export" / "m2mkd_finetune" / "model.json").read_text())
    # `dsincubate eval` of each student in the meta model and of the fine-tuned students agrees with their phases' logs
    kinds = ["m2mkd_hybrid:0", "m2mkd_hybrid:1", "m2mkd_finetune"]
    p = subprocess.run([sys.executable, "-m", "dsincubate", "eval", "--recipe", "debug", "--output", str(out),
                        "--model", ",".join(kinds), *sum((["--set", s] for s in cmd[cmd.index("--") + 2::2]), [])],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = {r["model"]: r for r in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{"))}
    for kind, d in zip(kinds, ["m2mkd/module_0", "m2mkd/module_1", "m2mkd/finetune"]):
        assert got[kind]["top1"] == json.loads((out / d / "run.json").read_text())["final"]["top1"], kind

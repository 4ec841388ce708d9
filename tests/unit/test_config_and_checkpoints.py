"""Unit tests: config overrides, ds_config rules, checkpoint files, the LR schedule, accounting."""
import json

import pytest
import torch

from dsincubate import accounting, checkpoint as ckpt, dsconfig, recipes
from dsincubate.config import RunConfig, apply_overrides
from dsincubate.engine import WarmupCosine
from dsincubate.errors import UserError


def test_overrides_and_roundtrip():
    cfg = apply_overrides(recipes.get("demo"), ["incubate.epochs=7", "model.stage_depths=1,3,3,1",
                                                "model.grad_checkpointing=true", "data.train=/x"])
    assert cfg.incubate.epochs == 7 and cfg.model.stage_depths == [1, 3, 3, 1] and cfg.model.grad_checkpointing
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(UserError, match="no such field"):
        apply_overrides(cfg, ["incubate.epoch=3"])
    with pytest.raises(UserError, match="cannot read"):
        apply_overrides(cfg, ["incubate.epochs=many"])
    with pytest.raises(UserError, match="unknown recipe"):
        recipes.get("vit_z")


def test_recipes_derive_and_follow_the_paper():
    b, h = recipes.get("vit_b16"), recipes.get("vit_h14")
    assert (b.meta.epochs, b.incubate.epochs, b.finetune.epochs, b.e2e.epochs) == (300, 100, 100, 300)
    assert b.finetune.warmup_epochs == 0 and b.e2e.lr == 5e-4 and b.e2e.weight_decay == 0.05
    assert h.finetune.drop_path == 0.6 and h.e2e.optimizer == "lamb" and h.model.grad_checkpointing
    assert recipes.get("deit_t_128").model.preset == "deit_t_128"


def test_ds_config_rules(tmp_path):
    for name in ("zero3_bf16", "zero2_bf16", "zero3_offload", "cpu"):
        dsconfig.load(dsconfig.find(name, has_cuda=False))  # every shipped config is valid
    assert dsconfig.find("auto", has_cuda=False).stem == "cpu"
    base = dsconfig.load(dsconfig.find("zero3_bf16", False))
    r = dsconfig.resolve(base, micro_batch=16, grad_accum=2, world_size=4, where="x")
    assert (r["train_micro_batch_size_per_gpu"], r["gradient_accumulation_steps"], r["train_batch_size"]) == (16, 2, 128)
    with pytest.raises(UserError, match="both"):
        dsconfig.resolve(dict(base, gradient_accumulation_steps=4), 16, 2, 1, "x")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 64}')
    with pytest.raises(UserError, match="belongs to the recipe"):
        dsconfig.load(bad)
    bad.write_text('{"zero_optimization": {"stage": 3},')
    with pytest.raises(UserError, match="invalid JSON"):
        dsconfig.load(bad)
    with pytest.raises(UserError, match="not found"):
        dsconfig.find("zero9", False)


def test_safetensors_handoff_and_manifest(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    ckpt.save_tensors(tmp_path / "m.safetensors", t, {"kind": "stage", "stage_index": 2})
    assert not ckpt.complete(tmp_path)  # no manifest yet: does not count
    ckpt.write_manifest(tmp_path, ["m.safetensors"])
    assert ckpt.complete(tmp_path)
    back, meta = ckpt.load_tensors(tmp_path / "m.safetensors")
    assert meta == {"kind": "stage", "stage_index": 2} and all(torch.equal(back[k], t[k]) for k in t)
    assert list(tmp_path.glob("*.tmp")) == []  # atomic writes leave no temp files
    with pytest.raises(UserError, match="not found"):
        ckpt.load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        ckpt.load_tensors(tmp_path / "junk.safetensors")


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.json"
    ckpt.atomic_write_json(path, {"v": 1})

    def crash_midway(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2, "half')
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        ckpt._atomic(path, crash_midway)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_latest_resume_tag_is_numeric_and_needs_manifest(tmp_path):
    for e in (9, 10, 100, 101):
        (tmp_path / ckpt.tag_for_epoch(e)).mkdir()
    for e in (9, 10, 100):
        ckpt.atomic_write_json(tmp_path / ckpt.tag_for_epoch(e) / ckpt.MANIFEST, {})
    assert ckpt.latest_resume_tag(tmp_path) == (ckpt.tag_for_epoch(100), 100)  # 101 has no manifest
    ckpt.prune_resume_tags(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.tag_for_epoch(100), ckpt.tag_for_epoch(101)]


def test_warmup_cosine_schedule():
    f = WarmupCosine(total_steps=100, warmup_steps=10, warmup_ratio=0.01, min_ratio=0.02)
    assert f(0) == pytest.approx(0.01) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.02 + 0.98 * 0.5) and f(100) == pytest.approx(0.02)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    g = WarmupCosine(total_steps=10, warmup_steps=0, warmup_ratio=0.0, min_ratio=0.0)  # fine-tune: no warmup
    assert g(0) == 1.0


def test_device_seconds_is_wall_times_devices():
    assert accounting.device_seconds(12.5, 8) == 100.0
    assert accounting.device_seconds(3.0, 1) == 3.0


def _session(tmp_path, resume_epoch, epochs, value):
    """One run of a phase as the trainer logs it: a fresh logger, the resume's truncation, 10 steps per epoch."""
    log = accounting.MetricLogger(tmp_path, enabled=True)
    if resume_epoch is not None:
        log.truncate_after(resume_epoch)
    for e in epochs:
        for step in range(10 * (e - 1) + 1, 10 * e + 1):
            log.scalar("train/loss", value + step, step)
        log.epoch({"epoch": e, "train_loss": value + e}, step=10 * e)
    log.close()


def test_after_a_kill_and_resume_metrics_and_tensorboard_hold_each_epoch_and_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _session(tmp_path, None, [1, 2, 3], 0.0)  # killed after logging epoch 3 but before its checkpoint
    _session(tmp_path, 2, [3, 4], 100.0)      # resumed from epoch 2's checkpoint: epoch 3 is trained again
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4] and lines[2]["train_loss"] == 103.0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    steps = [ev.step for ev in acc.Scalars("train/loss")]
    assert steps == list(range(1, 41))
    assert [ev.value for ev in acc.Scalars("train/loss")][20] == 121.0  # step 21 from the resumed run
    assert [(ev.step, ev.value) for ev in acc.Scalars("epoch/train_loss")] == [(10, 1.0), (20, 2.0), (30, 103.0),
                                                                                (40, 104.0)]


def test_an_output_made_before_a_field_existed_resumes_but_a_changed_field_is_refused(tmp_path):
    """config_key.json written by an older version lacks fields added since (here the V-MoE settings): at their
    defaults they are no difference; a field set to another value is; the meta model ignores MoE settings."""
    from dsincubate import phases
    from dsincubate.checks import check_output

    cfg = recipes.get("debug")
    phase = phases.make("e2e", cfg, tmp_path, 10, resolve=False)
    phase.out_dir.mkdir(parents=True)
    old = json.loads(json.dumps(phase.config_key(), default=str))
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("moe_")}
    ckpt.atomic_write_json(phase.out_dir / "config_key.json", old)
    check_output(phase)  # fields added since, at their defaults: the same config
    moe_cfg = apply_overrides(cfg, ["model.moe_every=2"])
    with pytest.raises(UserError, match="another config .differs in: model"):
        check_output(phases.make("e2e", moe_cfg, tmp_path, 10, resolve=False))
    meta = phases.make("meta", cfg, tmp_path, 10, resolve=False)
    meta.out_dir.mkdir(parents=True)
    ckpt.atomic_write_json(meta.out_dir / "config_key.json", json.loads(json.dumps(meta.config_key(), default=str)))
    check_output(phases.make("meta", moe_cfg, tmp_path, 10, resolve=False))  # a V-MoE target's meta is dense


def test_clip_grad_none_is_no_clipping_in_deepspeed():
    # DeepSpeed 0.19.8 clips at 1.0 when gradient_clipping is absent: "off" must reach it as 0
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in ("cpu", "zero2_bf16", "zero0_autocast_bf16"):
        r = dsconfig.resolve(dsconfig.load(dsconfig.find(name, False)), 8, None, 1, "x", clip_grad=None)
        assert r["gradient_clipping"] == 0.0
        assert DeepSpeedConfig(r).gradient_clipping == 0.0
        r = dsconfig.resolve(dsconfig.load(dsconfig.find(name, False)), 8, None, 1, "x", clip_grad=1.0)
        assert DeepSpeedConfig(r).gradient_clipping == 1.0


def test_stage_files_name_their_stage_index_and_old_ones_saying_index_still_assemble(tmp_path):
    """A stage file's header names its stage `stage_index`; one written before (header key "index") reads the same,
    so a set of old and new stage files still checks and orders for assembly. Only a stage file's key is renamed."""
    from dsincubate.assemble import check_stage_set

    common = {"kind": "stage", "num_stages": 2, "spec": "{}", "stage_depths": [1, 1], "meta_sha256": "x"}
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    ckpt.save_tensors(old, {"a": torch.zeros(1)}, dict(common, index=1))
    ckpt.save_tensors(new, {"a": torch.zeros(1)}, dict(common, stage_index=0))
    assert ckpt.read_meta(old) == dict(common, stage_index=1) == ckpt.load_tensors(old)[1]
    assert [f for f, _ in check_stage_set([old, new])] == [new, old]
    ckpt.save_tensors(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, {"kind": "meta", "index": 3})
    assert ckpt.read_meta(tmp_path / "m.safetensors") == {"kind": "meta", "index": 3}

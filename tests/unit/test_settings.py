"""Unit tests: every config field has documentation and a checked domain; each paper setting does what it says
(tunable / random meta, gradient clipping, uniform drop path, data fractions at equal iterations, DMT for meta and
fine-tune); the training contract (loss dict, exactly the intended parameters change)."""
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsincubate import checkpoint as ckpt, dsconfig, phases, recipes
from dsincubate.config import ALL_SECTIONS, TRAIN_SECTIONS, RunConfig, apply_overrides, config_lines
from dsincubate.errors import UserError
from dsincubate.models import staged, vit

SMALL = ["model.depth=4", "model.embed_dim=24", "model.num_heads=2", "model.num_stages=2", "model.kernel_backend=torch"]


def _cfg(*sets):
    return apply_overrides(recipes.get("debug"), SMALL + list(sets))


def test_config_fields_lists_every_field_of_every_section_with_documentation():
    for cls in ALL_SECTIONS:
        documented = {line.split(":", 1)[0].split(".", 1)[1] for line in config_lines(cls)}
        assert documented == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("setting, message", [
    ("e2e.lr=0", "e2e.lr"), ("e2e.lr=-1e-3", "e2e.lr"), ("meta.epochs=0", "meta.epochs"),
    ("finetune.min_lr=1", "above"), ("e2e.warmup_epochs=1", "not shorter"), ("incubate.micro_batch=0", "micro_batch"),
    ("e2e.optimizer=adam", "one of adamw, lamb, sgd"), ("incubate.meta_model=frozen", "one of fixed"),
    ("data.train_fraction=0", "train_fraction"), ("data.train_fraction=1.5", "train_fraction"),
    ("model.num_heads=5", "not divisible"), ("e2e.drop_path=1.0", "drop_path"), ("finetune.clip_grad=0", "clip_grad"),
    ("e2e.lr=nan", "e2e.lr"), ("data.dmt_splits=3", "dmt_splits"), ("e2e.grad_accum=0", "grad_accum"),
])
def test_invalid_setting_is_refused_when_the_config_is_built(setting, message):
    with pytest.raises(UserError, match=message):
        _cfg(setting)


def test_saved_config_with_a_bad_value_is_refused_on_load():
    d = _cfg().to_dict()
    d["incubate"]["epochs"] = 0
    with pytest.raises(UserError, match="incubate.epochs"):
        RunConfig.from_dict(json.loads(json.dumps(d)))


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(TRAIN_SECTIONS), field=st.sampled_from(["lr", "min_lr", "warmup_epochs", "epochs",
                                                                     "drop_path", "weight_decay", "micro_batch"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5),
                       st.text(max_size=4)))
def test_any_override_either_builds_a_valid_config_or_raises_user_error(section, field, value):
    """Fuzzed `--set` values never crash with another exception and never yield a config outside its domains."""
    try:
        cfg = _cfg(f"{section}.{field}={value}")
    except UserError:
        return
    tc = cfg.train_config(section)
    assert tc.lr > 0 and tc.min_lr <= tc.lr and tc.epochs >= 1 and tc.micro_batch >= 1
    assert 0 <= tc.drop_path < 1 and tc.weight_decay >= 0 and (tc.warmup_epochs == 0 or tc.warmup_epochs < tc.epochs)
    assert all(v == v for v in (tc.lr, tc.min_lr, tc.warmup_epochs, tc.drop_path, tc.weight_decay))  # no NaN


def test_recipes_follow_the_official_code_where_the_paper_is_silent():
    for name in ("vit_b16", "vit_l16", "vit_h14"):
        cfg = recipes.get(name)
        assert cfg.meta.drop_path == 0.0 and cfg.incubate.drop_path == 0.1 and cfg.finetune.clip_grad == 1.0
        assert cfg.e2e_tune == cfg.finetune and cfg.e2e_tune is not cfg.finetune
    assert recipes.get("vit_l16").e2e.drop_path_mode == "uniform" and recipes.get("vit_h14").e2e.drop_path_mode == "uniform"
    assert recipes.get("vit_b16").e2e.drop_path_mode == "linear"


def test_clip_grad_reaches_the_engine_config_and_refuses_a_second_setting():
    base = dsconfig.load(dsconfig.find("cpu", False))
    assert dsconfig.resolve(base, 8, None, 1, "x", clip_grad=1.0)["gradient_clipping"] == 1.0
    assert not dsconfig.resolve(base, 8, None, 1, "x").get("gradient_clipping")
    with pytest.raises(UserError, match="set both"):
        dsconfig.resolve(dict(base, gradient_clipping=0.5), 8, None, 1, "x", clip_grad=1.0)


def test_uniform_drop_path_puts_the_rate_in_every_block_linear_rises_from_zero():
    cfg = _cfg("e2e.drop_path=0.3", "e2e.drop_path_mode=uniform")
    model = phases.make("e2e", cfg, "/nonexistent", 10).build_model()
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([0.3] * 4)
    cfg = _cfg("e2e.drop_path=0.3")
    model = phases.make("e2e", cfg, "/nonexistent", 10).build_model()
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)


def _meta_run(tmp_path, cfg):
    """A run directory holding a (random) meta model, as `dsincubate meta` writes it."""
    meta = phases.make("meta", cfg, tmp_path, 10)
    model = meta.build_model()
    meta.out_dir.mkdir(parents=True)
    files = meta.save_output({k: v.detach().clone() for k, v in model.state_dict().items()})
    ckpt.write_manifest(meta.out_dir, files)
    return model.state_dict()


def _train_steps(model, steps=2):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])}


@pytest.mark.parametrize("mode", ["fixed", "tunable", "random"])
def test_meta_model_modes_train_exactly_the_intended_parameters(tmp_path, mode):
    cfg = _cfg(f"incubate.meta_model={mode}")
    meta_state = _meta_run(tmp_path, cfg)
    phase = phases.make("incubate", cfg, tmp_path, 10, 1)
    torch.manual_seed(0)
    model = phase.build_model()
    loaded = all(torch.equal(model.state_dict()[k], v) for k, v in meta_state.items() if not k.startswith("stages.1."))
    assert loaded == (mode != "random")  # the random-init ablation does not load the meta model
    changed = _train_steps(model)
    target = {n for n, _ in model.named_parameters() if n.startswith("stages.1.")}
    if mode == "fixed":
        assert changed == target
    else:
        assert target <= changed and any(not n.startswith("stages.1.") for n in changed)
    assert set(phase.output_names(model)) == target  # only the target module is handed to assembly


def test_random_meta_needs_no_meta_checkpoint_but_fixed_does(tmp_path):
    phases.make("incubate", _cfg("incubate.meta_model=random"), tmp_path, 10, 0)
    with pytest.raises(UserError, match="meta checkpoint missing"):
        phases.make("incubate", _cfg(), tmp_path, 10, 0)


def test_phase_loss_is_a_dict_with_the_loss():
    cfg = _cfg("incubate.imitation=true")
    out = phases.make("e2e", cfg, "/x", 10).loss(torch.randn(4, 10), torch.randint(0, 10, (4,)),
                                                  torch.nn.CrossEntropyLoss())
    assert set(out) >= {"loss"} and out["loss"].ndim == 0
    inc = phases.make("incubate", cfg, "/x", 10, 0, resolve=False)
    out = inc.loss(staged.Paired(torch.ones(2, 5, 24), torch.zeros(2, 5, 24)), None, None)
    assert out["loss"].item() == pytest.approx(1.0)  # Module Imitation: L1 to the meta stage's output


def test_e2e_tune_starts_from_the_e2e_model(tmp_path):
    cfg = _cfg()
    e2e = phases.make("e2e", cfg, tmp_path, 10)
    model = e2e.build_model()
    e2e.out_dir.mkdir(parents=True)
    ckpt.write_manifest(e2e.out_dir, e2e.save_output(dict(model.state_dict())))
    with pytest.raises(UserError, match="e2e model missing"):
        phases.make("e2e_tune", cfg, tmp_path / "other", 10)
    tuned = phases.make("e2e_tune", cfg, tmp_path, 10).build_model()
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["zero_epochs", "negative_lr", "output_is_a_file", "unreadable_saved_config",
                                  "bf16_not_an_object", "min_lr_above_lr"])
def test_bad_setting_from_the_command_line_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    from dsincubate import cli

    out = tmp_path / "run"
    args = ["e2e", "--recipe", "debug", "--output", str(out), "--set", f"data.demo_root={tmp_path / 'demo'}"]
    if case == "zero_epochs":
        args += ["--set", "e2e.epochs=0"]
    elif case == "negative_lr":
        args += ["--set", "e2e.lr=-0.1"]
    elif case == "min_lr_above_lr":
        args += ["--set", "e2e.min_lr=1.0"]
    elif case == "output_is_a_file":
        out.write_text("x")
    elif case == "unreadable_saved_config":
        out.mkdir()
        (out / "config.json").write_text("{oops")
        args.remove("--recipe"), args.remove("debug")
    elif case == "bf16_not_an_object":
        (tmp_path / "ds.json").write_text('{"bf16": true}')
        args += ["--ds-config", str(tmp_path / "ds.json")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsincubate: error:"), err
    assert sorted(p.name for p in tmp_path.rglob("*") if "demo" not in str(p)) == \
        [n for n in before if "demo" not in n]  # nothing written (the demo data aside)


def test_deit3_recipe_uses_lamb_three_augment_and_no_binary_cross_entropy():
    cfg = recipes.get("deit3_b16")
    assert {cfg.train_config(s).optimizer for s in TRAIN_SECTIONS} == {"lamb"}
    assert cfg.data.recipe == "3aug" and cfg.data.reprob == 0.0 and cfg.e2e.epochs == 400
    assert cfg.data.smoothing > 0  # cross-entropy with smoothing, as the supplementary's DeiT III*


def test_deit3_recipe_builds_layer_scale_1e4_into_target_and_meta_blocks_and_swin_variant_has_none():
    cfg = recipes.get("deit3_b16")
    assert cfg.model.layer_scale_init == 1e-4
    small = dataclasses.replace(cfg.model, preset="tiny", depth=4, embed_dim=32, num_heads=2)
    target = vit.target_spec(small, 10, 0.0)
    for spec in (target, vit.meta_spec(small, target, 0.0)):
        gammas = [p for n, p in vit.build(spec).named_parameters() if n.endswith((".ls1.gamma", ".ls2.gamma"))]
        assert len(gammas) == 2 * 4 and all(torch.all(g == 1e-4) for g in gammas)
    swin = recipes.get("swin_b_deit3")
    assert swin.model.layer_scale_init == 0.0 and swin.e2e.optimizer == "lamb"


def test_deit3_recipe_drops_paths_uniformly_in_every_phase_and_swin_variant_keeps_its_linear_schedule():
    cfg, swin = recipes.get("deit3_b16"), recipes.get("swin_b_deit3")
    assert {cfg.train_config(s).drop_path_mode for s in TRAIN_SECTIONS} == {"uniform"}
    assert {swin.train_config(s).drop_path_mode for s in TRAIN_SECTIONS} == {"linear"}
    assert recipes.get("vit_b16").incubate.drop_path_mode == "linear"


def test_paper_recipes_turn_repeated_augmentation_on_and_refuse_it_without_resampling():
    assert recipes.get("vit_b16").data.repeated_aug == 3 and recipes.get("demo").data.repeated_aug == 1
    with pytest.raises(UserError, match="resampled"):
        apply_overrides(recipes.get("vit_b16"), ["data.resampled=false"])


@pytest.mark.parametrize("index", [0, 1])
def test_cross_width_incubation_trains_exactly_the_module_and_its_stitches_and_hands_over_the_module(tmp_path, index):
    cfg = _cfg("model.meta_embed_dim=16", "model.meta_num_heads=2")  # meta width 16, target width 24
    meta_state = _meta_run(tmp_path, cfg)
    assert meta_state["stages.0.cls_token"].shape[-1] == 16
    phase = phases.make("incubate", cfg, tmp_path, 10, index)
    torch.manual_seed(0)
    model = phase.build_model()
    assert (model.stitch_in is None) == (index == 0) and (model.stitch_out is None) == (index == 1)
    changed = _train_steps(model)
    intended = {n for n, _ in model.named_parameters() if n.startswith((f"stages.{index}.", "stitch_"))}
    assert changed == intended and any(n.startswith("stitch_") for n in changed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in meta_state.items()
               if not k.startswith(f"stages.{index}."))  # the meta model did not move
    names = phase.output_names(model)
    assert names and all(n.startswith(f"stages.{index}.") for n in names)  # stitches are not handed to assembly
    assert model.stages[index].blocks[0].attn.qkv.weight.shape[-1] == 24


def test_cross_width_stage_files_assemble_into_a_model_of_the_target_width(tmp_path):
    from dsincubate.assemble import assemble

    cfg = _cfg("model.meta_embed_dim=16", "model.meta_num_heads=2")
    _meta_run(tmp_path, cfg)
    for i in range(2):
        phase = phases.make("incubate", cfg, tmp_path, 10, i)
        model = phase.build_model()
        phase.out_dir.mkdir(parents=True)
        files = phase.save_output({n: p.detach() for n, p in model.named_parameters() if n in phase.output_names(model)})
        ckpt.write_manifest(phase.out_dir, files)
    tensors, header = ckpt.load_tensors(assemble(tmp_path, None, 2))
    widths = {t.shape[-1] for k, t in tensors.items() if k.endswith(("norm1.weight", "norm2.weight", "cls_token"))}
    assert widths == {24} and vit.ModelSpec.from_json(header["spec"]).kwargs["embed_dim"] == 24
    model = staged.StagedModel(staged.divide(vit.build(vit.ModelSpec.from_json(header["spec"])), [2, 2]))
    model.load_state_dict(tensors, strict=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_meta_width_not_divisible_by_its_heads_is_refused():
    with pytest.raises(UserError, match="meta_embed_dim"):
        _cfg("model.meta_embed_dim=15", "model.meta_num_heads=2")

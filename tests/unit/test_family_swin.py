"""Unit tests of the Swin family through the model-family seam: divided at its four stages, timm-loadable export,
drop path per Swin block; and, for the Swin and the CIFAR ResNet alike, the meta model's fit at every stage boundary
(the shape `boundary_shape` reports), incubation's trained and saved set, and assembly."""
import copy
import json

import pytest
import timm
import torch
from timm.layers import DropPath

from dsincubate import checkpoint as ckpt, decoupled, phases, recipes
from dsincubate.assemble import export
from dsincubate.config import apply_overrides
from dsincubate.errors import UserError
from dsincubate.models import family, staged, swin


def _cfg(*overrides):
    return apply_overrides(recipes.get("swin_debug"), list(overrides))


def test_swin_divides_at_its_stages_and_composes_to_timms_forward():
    cfg = _cfg()
    spec = phases.make("e2e", cfg, "/x", 10, resolve=False).target_spec(0.0)
    assert family.family_of(spec) is swin.FAMILY and family.stage_depths(cfg.model, spec) == [1, 1, 1, 1]
    torch.manual_seed(0)
    whole = family.build(spec).eval()
    sm = family.build_staged(spec, [1, 1, 1, 1]).eval()
    whole.load_state_dict(staged.timm_state_dict(sm, swin.FAMILY.block_prefix), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(whole(x), sm(x))
    assert [swin.FAMILY.boundary_width(spec, i) for i in range(4)] == [32, 64, 128, 256]


# The family contract, for the two families beside the ViT (test_models.py has the ViT's): the meta model fits the
# target at every boundary, incubation trains exactly the target stage, assembled stages compose to the whole model.
FAMILIES = ["resnet_debug", "swin_debug"]


def _target(recipe):
    cfg = recipes.get(recipe)
    phase = phases.make("e2e", cfg, "/x", 10, resolve=False)
    return cfg, phase.target_spec(0.0), phase.depths()


@pytest.mark.parametrize("recipe", FAMILIES)
def test_meta_model_and_target_give_the_familys_boundary_shape_at_every_stage_boundary(recipe):
    cfg, spec, depths = _target(recipe)
    fam = family.family_of(spec)
    torch.manual_seed(0)
    target = family.build_staged(spec, depths).eval()
    meta = phases.build_meta_model(cfg, 10).eval()
    assert len(meta.stages) == len(target.stages) == cfg.model.num_stages
    assert sum(p.numel() for p in meta.parameters()) < sum(p.numel() for p in target.parameters())
    x_t = x_m = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for i, (t, m) in enumerate(zip(target.stages[:-1], meta.stages[:-1])):
            x_t, x_m = t(x_t), m(x_m)
            want = fam.boundary_shape(spec, i)
            assert tuple(x_t.shape[1:]) == tuple(x_m.shape[1:]) == tuple(want.shape), (i, x_t.shape, want)
            assert fam.boundary_width(spec, i) == (want.shape[0] if want.grid is None else want.shape[-1])
            assert decoupled.aux_classifier(want, 10)(x_t).shape == (2, 10)  # the baselines' heads fit it


@pytest.mark.parametrize("recipe", FAMILIES)
def test_incubation_trains_exactly_the_target_stage_and_saves_all_of_it(recipe):
    cfg, _, depths = _target(recipe)
    torch.manual_seed(0)
    meta = phases.build_meta_model(cfg, 10)
    target = phases.make("e2e", cfg, "/x", 10, resolve=False).target()
    for i in range(len(depths)):
        hybrid = staged.Hybrid(list(copy.deepcopy(meta).stages), copy.deepcopy(target.stages[i]), i).train()
        before = {k: v.clone() for k, v in hybrid.state_dict().items()}
        opt = torch.optim.SGD([p for p in hybrid.parameters() if p.requires_grad], lr=0.1)
        loss = torch.nn.functional.cross_entropy(hybrid(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        opt.step()
        after = hybrid.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        prefix = f"stages.{i}."
        assert changed and all(k.startswith(prefix) for k in changed), sorted(changed)[:5]
        assert {k for k, p in hybrid.named_parameters() if p.requires_grad} == \
            {prefix + k for k, _ in hybrid.stages[i].named_parameters()}
        if recipe == "resnet_debug":  # the target stage's BN learns its statistics in train mode
            assert any("running_mean" in k for k in changed)
        names = phases.make("incubate", cfg, "/x", 10, i, resolve=False).output_names(hybrid)
        assert set(names) == {k for k in after if k.startswith(prefix)}  # parameters and persistent buffers


@pytest.mark.parametrize("recipe", FAMILIES)
def test_assembled_forward_equals_stages_applied_in_turn_and_the_whole_model(recipe):
    _, spec, depths = _target(recipe)
    fam = family.family_of(spec)
    stages = []
    for i in range(len(depths)):  # independently initialised stages, as the incubation jobs give
        torch.manual_seed(100 + i)
        stages.append(fam.stage_only(spec, depths, i).eval())
    assembled = family.build_staged(spec, depths).eval()
    for i, s in enumerate(stages):
        assembled.stages[i].load_state_dict(s.state_dict(), strict=True)
    whole = family.build(spec).eval()
    whole.load_state_dict(staged.timm_state_dict(assembled, fam.block_prefix), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert torch.equal(assembled(x), y) and torch.equal(whole(x), y)


def test_swin_export_loads_into_timm_with_identical_logits(tmp_path):
    cfg = _cfg()
    phase = phases.make("finetune", cfg, tmp_path, 10, resolve=False)
    torch.manual_seed(0)
    model = phase.target().eval()
    ckpt.write_manifest(phase.out_dir, phase.save_output(dict(model.state_dict())), {})
    out = export(tmp_path, "finetune")
    args = json.loads((out.parent / "model.json").read_text())
    args.pop("pretrained_cfg_overlay")
    timm_model = timm.create_model(args.pop("model_name"), pretrained=False, **args).eval()
    timm_model.load_state_dict(ckpt.load_tensors(out)[0], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(timm_model(x), model(x))


def test_swin_drop_path_runs_over_its_blocks_in_every_build():
    cfg = _cfg("e2e.drop_path=0.4", "e2e.drop_path_mode=uniform", "incubate.drop_path=0.4", "model.num_stages=4")
    model = phases.make("e2e", cfg, "/x", 10, resolve=False).target()
    blocks = [b for s in model.stages for layer in s.blocks for b in layer.blocks]
    assert len(blocks) == 5 and all(isinstance(b.drop_path1, DropPath) and b.drop_path1.drop_prob == 0.4
                                    for b in blocks)
    stage = phases.make("incubate", cfg, "/x", 10, 2, resolve=False).target_stage_only()
    rates = [b.drop_path1.drop_prob for b in stage.blocks[0].blocks]  # blocks 2 and 3 of 5, linear to 0.4
    assert rates == pytest.approx([0.2, 0.3])


def test_swin_refuses_fixed_fields_and_other_divisions():
    with pytest.raises(UserError, match="model.embed_dim: not a setting of swin_debug"):
        family.target_spec(_cfg("model.embed_dim=64").model)
    with pytest.raises(UserError, match="Swin divides at its stage boundaries"):
        phases.make("meta", _cfg("model.num_stages=2"), "/x", 10, resolve=False).depths()
    assert recipes.get("swin_b_deit3").model.num_stages == swin.FAMILY.default_num_stages

"""Unit tests of the Swin family through the model-family seam: divided at its four stages, the meta model's fit at
every boundary, incubation's trained set, assembly, timm-loadable export, drop path per Swin block."""
import json

import pytest
import timm
import torch
from timm.layers import DropPath

from dsincubate import checkpoint as ckpt, phases, recipes
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


def test_swin_meta_model_matches_target_at_every_stage_boundary():
    cfg = _cfg("model.meta_depth_per_stage=1")
    target = phases.make("e2e", cfg, "/x", 10, resolve=False).target().eval()
    meta = phases.build_meta_model(cfg, 10).eval()
    assert [len(s.blocks[0].blocks) for s in meta.stages] == [1, 1, 1, 1]
    x_t = x_m = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t, m in zip(target.stages, meta.stages):
            x_t, x_m = t(x_t), m(x_m)
            assert x_t.shape == x_m.shape


def test_swin_incubation_trains_exactly_the_target_stage():
    cfg = _cfg()
    meta = phases.build_meta_model(cfg, 10)
    target = phases.make("e2e", cfg, "/x", 10, resolve=False).target()
    hybrid = staged.Hybrid(list(meta.stages), target.stages[2], 2).train()
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    opt = torch.optim.SGD([p for p in hybrid.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(hybrid(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    changed = {k for k, v in hybrid.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("stages.2.") for k in changed)


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

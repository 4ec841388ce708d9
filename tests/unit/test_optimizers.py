"""The optimizers a phase can name (`TrainConfig.optimizer`: adamw, lamb, sgd) and their weight-decay groups.

The groups follow timm's rule (no decay for 1-D tensors, biases and the model's `no_weight_decay` names) judged on
each parameter's full shape, so a model built inside `deepspeed.zero.Init` (ZeRO-3: every parameter an empty 1-D
placeholder with its shape in `ds_shape`) keeps the weight decay of its weights; the two-rank ZeRO-3 run is
tests/integration/test_sgd_zero.py. Unit tier."""
from pathlib import Path

import pytest
import torch
from timm.optim import param_groups_weight_decay

from dsincubate import dsconfig, phases, recipes
from dsincubate.config import apply_overrides
from dsincubate.engine import build_optimizer, param_groups, resolve_ds_config
from dsincubate.errors import UserError


def _phase(cfg, name="e2e"):
    return phases.make(name, cfg, Path("/nonexistent-run"), 10, None, resolve=False)


def _names(model, groups):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], sorted(ids[id(p)] for p in g["params"])) for g in groups]


@pytest.mark.parametrize("recipe", ["debug", "resnet_debug", "swin_debug"])
def test_weight_decay_groups_are_timms_and_stay_so_when_zero3_leaves_only_placeholders(recipe):
    model = _phase(recipes.get(recipe)).build_model(load=False)
    nwd = model.no_weight_decay()
    want = _names(model, param_groups_weight_decay(model, 0.05, no_weight_decay_list=nwd))
    assert _names(model, param_groups(model, 0.05, set(nwd))) == want and len(want) == 2
    for p in model.parameters():  # what deepspeed.zero.Init leaves on a rank: an empty 1-D tensor, its shape aside
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert _names(model, param_groups(model, 0.05, set(nwd))) == want
    assert _names(model, param_groups_weight_decay(model, 0.05, no_weight_decay_list=nwd))[0][1] == \
        sorted(n for n, _ in model.named_parameters())  # timm's rule alone: nothing decayed (the bug)


def test_frozen_parameters_stay_out_of_every_group_and_zero_decay_makes_one_group():
    model = _phase(recipes.get("debug")).build_model(load=False)
    frozen = [n for n, p in model.named_parameters() if n.startswith("stages.0.")]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    names = [n for _, ns in _names(model, param_groups(model, 0.05, set())) for n in ns]
    assert frozen and not set(frozen) & set(names) and len(names) == len(list(model.parameters())) - len(frozen)
    assert [wd for wd, _ in _names(model, param_groups(model, 0.0, set()))] == [0.0]


def test_sgd_is_nesterov_momentum_with_l2_decay_groups_at_the_scaled_rate():
    cfg = apply_overrides(recipes.get("resnet110_cifar_sgd"), ["model.depth=6", "e2e.momentum=0.8"])
    phase = _phase(cfg)
    model = phase.build_model(load=False)
    opt = build_optimizer(model, phase.train_cfg, 0.1, {"zero_optimization": {"stage": 0}})
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.8
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-4] and opt.defaults["lr"] == 0.1
    plain = build_optimizer(model, apply_overrides(cfg, ["e2e.momentum=0"]).e2e, 0.1, {})
    assert not plain.defaults["nesterov"]  # torch refuses Nesterov without momentum


def test_sgd_under_zero_is_allowed_for_deepspeed_and_refused_with_offload_or_a_false_allowance(tmp_path):
    sgd = apply_overrides(recipes.get("resnet110_cifar_sgd"), ["model.depth=6", "ds_config=zero2_bf16"])
    f, ds = resolve_ds_config(_phase(sgd), True, 8)
    assert f.stem == "zero2_bf16" and ds["zero_allow_untested_optimizer"] is True
    adamw = apply_overrides(recipes.get("resnet110_cifar"), ["model.depth=6", "ds_config=zero2_bf16"])
    assert "zero_allow_untested_optimizer" not in resolve_ds_config(_phase(adamw), True, 8)[1]
    assert "zero_allow_untested_optimizer" not in resolve_ds_config(_phase(apply_overrides(
        sgd, ["ds_config=cpu"])), False, 1)[1]  # ZeRO-0: DeepSpeed takes any optimizer
    with pytest.raises(UserError, match=r"e2e\.optimizer=sgd cannot be used with optimizer offload"):
        resolve_ds_config(_phase(apply_overrides(sgd, ["ds_config=zero3_offload"])), True, 8)
    own = tmp_path / "z2.json"
    own.write_text('{"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": false}')
    with pytest.raises(UserError, match=r"e2e\.optimizer=sgd under ZeRO stage 2 needs zero_allow_untested_optimizer"):
        resolve_ds_config(_phase(apply_overrides(sgd, [f"ds_config={own}"])), True, 8)
    assert dsconfig.choose(True, "sgd", 10**6, 8, 80 * 2**30) == "zero2_bf16"


@pytest.mark.parametrize("bad", ["e2e.optimizer=adam", "e2e.momentum=1.0", "e2e.momentum=-0.1"])
def test_an_unknown_optimizer_or_a_momentum_outside_0_to_1_is_refused(bad):
    with pytest.raises(UserError, match=bad.split("=")[0].replace(".", r"\.")):
        apply_overrides(recipes.get("resnet110_cifar_sgd"), [bad])

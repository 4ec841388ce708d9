"""Defaults for large models (issue 21, item 8): `ds_config=auto` picks the ZeRO stage per phase from the target's
parameter count, the world size and the device memory (`dsconfig.choose`, rule in `dsincubate.dsconfig`), a ds_config
the user names wins, LAMB phases get ZeRO-0, and fp32 gradient reduction is a run setting (`grad_reduce_dtype`)
filled into DeepSpeed's `communication_data_type`, which DeepSpeed 0.19.8 reads; set in both places it is refused."""
import json
from pathlib import Path

import pytest
import torch

from dsincubate import dsconfig, phases, recipes
from dsincubate.config import apply_overrides
from dsincubate.engine import resolve_ds_config, target_params
from dsincubate.errors import UserError

GB = 10**9
H100 = 80 * 2**30


def _phase(cfg, name="finetune", tmp=Path("/nonexistent-run")):
    return phases.make(name, cfg, tmp, 1000, 0 if name == "incubate" else None, resolve=False)


def test_presets_have_the_paper_parameter_counts_the_rule_uses():
    counts = {r: target_params(_phase(recipes.get(r))) for r in ("vit_b16", "vit_l16", "vit_h14")}
    assert round(counts["vit_b16"] / 1e6, 1) == 86.6
    assert round(counts["vit_l16"] / 1e6) == 304
    assert round(counts["vit_h14"] / 1e6) == 632


@pytest.mark.parametrize("preset,world,device,want", [
    # 8 x 80 GB: every paper model fits ZeRO-2 (ViT-H: 2 + 14/8 bytes x 632 M = 2.4 GB per rank)
    ("vit_b16", 8, H100, "zero2_bf16"), ("vit_l16", 8, H100, "zero2_bf16"), ("vit_h14", 8, H100, "zero2_bf16"),
    # one 80 GB device: ViT-H's 16 bytes x 632 M = 10.1 GB still fits in half of it
    ("vit_h14", 1, H100, "zero2_bf16"),
    # 8 x 16 GB (V100-16GB): ZeRO-2 still fits ViT-H (2.4 GB <= 8 GB)
    ("vit_h14", 8, 16 * 2**30, "zero2_bf16"),
    # 8 x 4 GB: ZeRO-2's 2.4 GB is over 2 GB, ZeRO-3's 16/8 bytes x 632 M = 1.26 GB fits
    ("vit_h14", 8, 4 * 2**30, "zero3_bf16"), ("vit_l16", 8, 2 * 2**30, "zero3_bf16"),
    # one 16 GB device: neither stage fits ViT-H's 10.1 GB in 8 GB -> offload
    ("vit_h14", 1, 16 * 2**30, "zero3_offload"),
])
def test_auto_picks_the_lowest_zero_stage_whose_model_states_fit_half_a_device(preset, world, device, want):
    cfg = recipes.get(preset)
    for name in ("meta", "incubate", "finetune"):  # the AdamW phases; the size of the target decides for all
        f, ds = resolve_ds_config(_phase(cfg, name), True, world, device_bytes=device)
        assert f.stem == want, (preset, name, world, device)
        assert dsconfig.zero_stage(ds) == int(want[4])


def test_stage_rule_arithmetic():
    p = 632_045_800
    assert dsconfig.model_state_bytes(p, 0, 8) == 16 * p
    assert dsconfig.model_state_bytes(p, 2, 8) == 2 * p + 14 * p / 8
    assert dsconfig.model_state_bytes(p, 3, 8) == 16 * p / 8
    assert dsconfig.choose(True, "adamw", p, 8, H100, moe=True) == "zero2_bf16"  # a V-MoE never gets ZeRO-3
    assert dsconfig.choose(False, "adamw", p, 8, H100) == "cpu"  # no CUDA: unchanged


def test_lamb_phases_get_zero0_and_a_named_ds_config_wins():
    h = recipes.get("vit_h14")
    f, ds = resolve_ds_config(_phase(h, "e2e"), True, 8, device_bytes=H100)  # the LAMB E2E baseline
    assert f.stem == "zero0_autocast_bf16" and dsconfig.zero_stage(ds) == 0 and ds["torch_autocast"]["enabled"]
    # fp32 weights (what LAMB and the inputs see), bf16 matmuls
    assert dsconfig.precision(ds) == torch.float32 and dsconfig.compute_dtype(ds) == torch.bfloat16
    named = apply_overrides(h, ["ds_config=zero3_bf16"])
    assert resolve_ds_config(_phase(named, "finetune"), True, 8, device_bytes=H100)[0].stem == "zero3_bf16"
    with pytest.raises(UserError, match=r"e2e\.optimizer=lamb cannot run under ZeRO stage 3"):
        resolve_ds_config(_phase(named, "e2e"), True, 8, device_bytes=H100)
    deit3 = apply_overrides(recipes.get("deit3_b16"), ["ds_config=zero2_bf16"])
    with pytest.raises(UserError, match=r"meta\.optimizer=lamb .*ZeRO stage 2"):
        resolve_ds_config(_phase(deit3, "meta"), True, 8, device_bytes=H100)


def test_fp32_gradient_reduction_reaches_the_resolved_ds_config_and_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    for preset in ("vit_l16", "vit_h14"):  # the large-model recipes reduce in fp32
        _, ds = resolve_ds_config(_phase(recipes.get(preset)), True, 8, device_bytes=H100)
        assert ds["communication_data_type"] == "fp32" and ds["bf16"]["enabled"]
        assert DeepSpeedConfig(dict(ds, train_batch_size=ds["train_micro_batch_size_per_gpu"] *
                                    ds["gradient_accumulation_steps"])).communication_data_type == torch.float32
    _, ds = resolve_ds_config(_phase(recipes.get("vit_b16")), True, 8, device_bytes=H100)
    assert "communication_data_type" not in ds  # default: the ds_config's (bf16 with bf16)
    b = apply_overrides(recipes.get("vit_b16"), ["grad_reduce_dtype=fp32"])
    assert resolve_ds_config(_phase(b), False, 2)[1]["communication_data_type"] == "fp32"


def test_gradient_reduction_dtype_set_in_both_places_is_refused(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
                                "communication_data_type": "bf16"}))
    cfg = apply_overrides(recipes.get("vit_h14"), [f"ds_config={path}"])  # the recipe sets grad_reduce_dtype=fp32
    with pytest.raises(UserError, match="set both in .*communication_data_type=bf16.*grad_reduce_dtype=fp32"):
        resolve_ds_config(_phase(cfg), True, 8, device_bytes=H100)
    ok = apply_overrides(cfg, ["grad_reduce_dtype=auto"])  # leaving it to the file is fine
    assert resolve_ds_config(_phase(ok), True, 8, device_bytes=H100)[1]["communication_data_type"] == "bf16"
    with pytest.raises(UserError, match="grad_reduce_dtype"):
        apply_overrides(cfg, ["grad_reduce_dtype=fp8"])

"""ZeRO-3 model construction for the model families beside the ViT (tests/integration/test_zero3_build.py has the
ViT's): on 2 ranks through the real `deepspeed` launcher, the CIFAR ResNet (`resnet_debug`) and the Swin
(`swin_debug`) are built inside `deepspeed.zero.Init` by each phase's `build_model_zero3` (E2E from scratch,
fine-tuning from a file, incubation from the meta model's file with a fresh target stage): every parameter is
partitioned from the start (a rank holds half), the family's initialisation reached the partitioned parameters,
and every tensor of the loaded file, parameters and persistent buffers (BN statistics), arrived exactly. Both families
in one launch: a launch of 2 ranks costs the 2-core CI machine about 20 s. Integration tier."""

import pytest

pytestmark = pytest.mark.integration

CHILD = r'''
import contextlib, json, sys, torch, deepspeed
from pathlib import Path
from dsincubate import dist, phases, recipes, checkpoint as ckpt
from dsincubate.config import apply_overrides
from dsincubate.engine import resolve_ds_config
from dsincubate.models import family
ctx = dist.init()
out = Path(sys.argv[-1])
# the incubated stage: one whose target depth differs from the meta model's (ResNet: 2 blocks, Swin stage 2: 2 blocks)
INDEX = {"resnet_debug": 1, "swin_debug": 2}
# (weights checked, the std the family's init gives them): He's N(0, 2 / (k^2 out)) for a ResNet's 3x3 convolutions,
# timm's trunc_normal(std=.02) for a Swin's Linear layers
INIT = {"resnet_debug": ("conv2.weight", lambda p: (2 / (9 * p.shape[0])) ** 0.5),
        "swin_debug": ("mlp.fc1.weight", lambda p: 0.02)}


def shifted(model, by):  # values no fresh build gives: floating tensors shifted, counters kept
    return {k: (v.detach() + by if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()}


def build_and_check(cfg, sub, name, index):
    """Phase `name`'s ZeRO-3 build, checked against the file it loads and the family's init."""
    phase = phases.make(name, cfg, sub, 10, index if name == "incubate" else None, resolve=False)
    if name == "finetune":
        phase.source_path = sub / "src.safetensors"
        if ctx.rank == 0:
            src = phases.make("e2e", cfg, sub, 10, resolve=False).build_model(load=False)
            ckpt.save_tensors(phase.source_path, shifted(src, 0.5), {})
    if name == "incubate":
        phase.meta_path = sub / "meta.safetensors"
        if ctx.rank == 0:
            ckpt.save_tensors(phase.meta_path, shifted(phases.build_meta_model(cfg, 10), 1.0), {})
    dist.barrier()
    _, ds_cfg = resolve_ds_config(phase, False, ctx.world_size)
    model = phase.build_model_zero3(ds_cfg, load=name != "e2e")
    params = dict(model.named_parameters())
    want = {} if name == "e2e" else ckpt.load_tensors(phase.source_path if name == "finetune" else phase.meta_path)[0]
    fresh = f"stages.{index}." if name == "incubate" else "-"  # the target stage incubation starts afresh
    expected = [k for k in want if not k.startswith(fresh)]
    same, checked = True, 0
    for k, t in list(params.items()) + list(model.named_buffers()):
        if k in expected:
            with deepspeed.zero.GatheredParameters([t]) if k in params else contextlib.nullcontext():
                same &= torch.equal(t.data.float(), want[k].to(t.dtype).float())
            checked += 1
    suffix, std = INIT[cfg.name]
    inited = [p for k, p in params.items() if k.endswith(suffix) and (name == "e2e" or k.startswith(fresh))]
    with deepspeed.zero.GatheredParameters(inited):
        ratio = [float(p.data.float().std()) / std(p) for p in inited]
    fam = family.family_of(phase.target_spec(0.0))
    return {"same": bool(same), "checked": checked, "expected": len(expected), "init_std_ratio": ratio,
            "partitioned": all(hasattr(p, "ds_tensor") for p in params.values()),
            "held": sum(p.ds_tensor.numel() for p in params.values()),
            "total": sum(p.ds_numel for p in params.values()), "dtype": str(next(iter(params.values())).dtype),
            "units": [sum(len(fam.drop_path_units(b)) for b in s.blocks) for s in model.stages]}


res = {}
for recipe, index in INDEX.items():
    cfg = apply_overrides(recipes.get(recipe), ["ds_config=zero3_bf16"])
    (out / recipe).mkdir(exist_ok=True)
    for name in ("e2e", "finetune", "incubate"):
        try:  # a refusal (both ranks meet it before any collective) is recorded: the other family still runs
            res[f"{recipe}/{name}"] = build_and_check(cfg, out / recipe, name, index)
        except Exception as e:
            res[f"{recipe}/{name}"] = {"error": f"{type(e).__name__}: {e}"}
if ctx.rank == 0:
    (out / "result.json").write_text(json.dumps(res))
dist.shutdown()
'''


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory, two_rank_script) -> dict:
    """The child's records, "<recipe>/<phase>" -> its checks' values (or {"error": ...}), from one 2-rank launch."""
    out = tmp_path_factory.mktemp("family_zero3")
    return two_rank_script(CHILD, out, 29549, str(out))


def check_family(res: dict, recipe: str, incubate_units: list, e2e_units: list) -> None:
    for name in ("e2e", "finetune", "incubate"):
        r = res[f"{recipe}/{name}"]
        assert "error" not in r, (name, r)
        assert r["partitioned"] and r["dtype"] == "torch.bfloat16", (name, r)
        assert r["held"] <= r["total"] / 2 + 1000, (name, r)  # this rank's half only
        assert r["same"] and r["checked"] == r["expected"], (name, r)  # every tensor of the file, exactly
        if name != "finetune":  # built afresh (all of E2E, incubation's target stage): the family's init reached
            # the partitioned weights (PyTorch's defaults would give ratios of ~0.4 / ~5)
            assert r["init_std_ratio"] and all(0.8 < x < 1.2 for x in r["init_std_ratio"]), (name, r)
    assert res[f"{recipe}/finetune"]["expected"] > 0 and res[f"{recipe}/incubate"]["expected"] > 0
    # incubation builds the meta model (1 block per stage) with the target's stage alone in its place
    assert res[f"{recipe}/incubate"]["units"] == incubate_units and res[f"{recipe}/e2e"]["units"] == e2e_units


def test_resnet_zero3_builds_on_two_ranks_are_partitioned_initialised_like_he_and_hold_the_files_weights(
        zero3_results):
    check_family(zero3_results, "resnet_debug", [1, 2, 1], [2, 2, 2])


def test_swin_zero3_builds_on_two_ranks_are_partitioned_initialised_like_timm_and_hold_the_files_weights(
        zero3_results):
    check_family(zero3_results, "swin_debug", [1, 1, 2, 1], [1, 1, 2, 1])

"""SGD is SGD under DeepSpeed ZeRO. InfoPro's and DGL's CIFAR ResNet optimiser (`optimizer=sgd`: Nesterov momentum,
L2 weight decay per parameter group; the `resnet110_cifar_sgd` recipe) is elementwise, so a ZeRO shard must be
updated exactly as its tensors would be; DeepSpeed lists Adam-type optimizers only and asserts on any other under
ZeRO, so `resolve_ds_config` allows it (`zero_allow_untested_optimizer`). The recipe's E2E phase under ZeRO-3 (fp32,
the optimizer steps flat shards) trained for 5 steps on 2 CPU ranks through the real `deepspeed` launcher must equal
one process's torch SGD given the same two halves of every batch, step for step (1e-6). Optimizer offload (DeepSpeed
steps its own CPU Adam there) is refused in one line before anything starts. Integration tier."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SHRINK = ["model.depth=6", "model.num_classes=10", "e2e.micro_batch=4", "e2e.lr=8.0", "ds_config=zero3_fp32"]

CHILD = r'''
import json, sys, torch, deepspeed
import torch.nn.functional as F
from pathlib import Path
from timm.optim import param_groups_weight_decay
from dsincubate import dist, phases, recipes
from dsincubate.config import apply_overrides
from dsincubate.engine import build_engine, resolve_ds_config, scaled_lr
ctx = dist.init()
out = Path(sys.argv[-1])
cfg = apply_overrides(recipes.get("resnet110_cifar_sgd"), json.loads(sys.argv[-2]))
phase = phases.make("e2e", cfg, out, 10, None, resolve=False)
tc = phase.train_cfg
ds_file, ds_cfg = resolve_ds_config(phase, False, ctx.world_size)
built = build_engine(phase, ctx, ds_cfg, steps_per_epoch=None, load=False)  # constant lr
engine = built.engine
lr = scaled_lr(tc.lr, ds_cfg["train_batch_size"])
micro, steps = tc.micro_batch, 5
gen = torch.Generator().manual_seed(1)
batches = [(torch.randn(2 * micro, 3, 32, 32, generator=gen), torch.randint(0, 10, (2 * micro,), generator=gen))
           for _ in range(steps)]
dist.seed_everything(cfg.seed)  # as build_engine does before building
ref = phase.build_model(load=False)
groups = param_groups_weight_decay(ref, tc.weight_decay, no_weight_decay_list=ref.no_weight_decay())
ref_opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
init = {n: p.detach().clone() for n, p in ref.named_parameters()}


def reference_step(x, y):
    """Both ranks' halves in one process: each half's gradient as its rank computes it (BatchNorm on its own
    half), then their mean."""
    grads = []
    for r in range(2):
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x[r * micro:(r + 1) * micro]), y[r * micro:(r + 1) * micro]).backward()
        grads.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    for n, p in ref.named_parameters():
        p.grad = (grads[0][n] + grads[1][n]) * 0.5
    ref_opt.step()


def max_diff():
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # ZeRO-3 holds each rank's shard only
        want = dict(ref.named_parameters())
        return max(float((p.detach() - want[n].detach()).abs().max()) for n, p in engine.module.named_parameters())


inner = engine.optimizer.optimizer  # the client SGD inside DeepSpeed's ZeRO-3 optimizer
res = {"ds_config": ds_file.stem, "zero_stage": ds_cfg["zero_optimization"]["stage"],
       "allow": ds_cfg.get("zero_allow_untested_optimizer"), "inner": type(inner).__name__,
       "nesterov": inner.defaults["nesterov"], "momentum": inner.defaults["momentum"],
       "zero_optimizer": type(engine.optimizer).__name__,
       "weight_decays": sorted({g["weight_decay"] for g in inner.param_groups}), "start": max_diff(), "steps": []}
for x, y in batches:
    xs, ys = x[ctx.rank * micro:(ctx.rank + 1) * micro], y[ctx.rank * micro:(ctx.rank + 1) * micro]
    engine.backward(F.cross_entropy(engine(xs), ys))
    engine.step()
    reference_step(x, y)
    res["steps"].append(max_diff())
res["moved"] = max(float((p.detach() - init[n]).abs().max()) for n, p in ref.named_parameters())
if ctx.rank == 0:
    (out / "result.json").write_text(json.dumps(res))
dist.shutdown()
'''


def test_sgd_under_zero3_on_two_ranks_equals_single_process_torch_sgd_step_for_step(tmp_path, two_rank_script):
    res = two_rank_script(CHILD, tmp_path, 29571, json.dumps(SHRINK), str(tmp_path))
    assert (res["ds_config"], res["zero_stage"], res["allow"], res["inner"]) == ("zero3_fp32", 3, True, "SGD"), res
    assert res["nesterov"] and res["momentum"] == 0.9, res
    # norms and biases undecayed, weights L2-decayed: judged on each partitioned parameter's full shape (ds_shape;
    # timm's rule reads a ZeRO-3 placeholder as 1-D and left no weight decayed)
    assert sorted(res["weight_decays"]) == [0.0, 1e-4], res
    assert res["zero_optimizer"] == "DeepSpeedZeroOptimizer_Stage3", res
    assert res["start"] == 0.0, res
    assert res["moved"] > 1e-3, res  # the steps are large enough for a wrong update to show
    assert len(res["steps"]) == 5 and max(res["steps"]) <= 1e-6, res


def test_sgd_with_optimizer_offload_is_refused_in_one_line_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "dsincubate", "e2e", "--recipe", "resnet_debug", "--output", str(out),
                        "--ds-config", "zero3_offload", "--set", "e2e.optimizer=sgd"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(err) == 1 and "e2e.optimizer=sgd cannot be used with optimizer offload" in err[0], err
    assert not out.exists()

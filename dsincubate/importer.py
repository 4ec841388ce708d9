"""`dsincubate import`: the official Deep-Incubation code's `.pth` files as this project's safetensors outputs.

    dsincubate import meta.pth        --recipe vit_b16 --output runs/vitb             # -> meta/ (a meta model)
    dsincubate import incubated_2.pth --recipe vit_b16 --output runs/vitb             # -> incubate/module_2/
    dsincubate import vit_base.pth    --recipe vit_b16 --output runs/vitb [--as e2e]  # -> finetune/ (or e2e/)

The official code (LeapLabTHU/Deep-Incubation) saves `{"model", "model_stages", "optimizer", "lr_scheduler",
"epoch", "args", ...}`; `model_stages[i]` is stage i's state dict with this project's stage-local names (stage 0 holds
patch_embed, cls_token and pos_embed, the last stage norm and head, blocks numbered from 0 in each stage). What a file
is comes from its blocks per stage: all at `meta_depth_per_stage` = a meta model, all at the target's stage depths = a
whole model, one at the target's depth and the others at the meta's = the module incubated at that index.

Files are read with `torch.load(weights_only=True)` (argparse.Namespace allowed: the official code saves its `args`);
every stage is loaded strictly into this project's model of the run's recipe, so a file of another architecture
(width, depth, patch, qkv bias, classes) is refused with the keys that differ. Each output is written like the phase
that makes it (safetensors with its header, run.json, config_key.json, MANIFEST.json last), so incubation, assembly,
fine-tuning, eval and export take it as their input.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import torch

from dsincubate import checkpoint as ckpt, phases
from dsincubate.errors import UserError
from dsincubate.layout import RunLayout
from dsincubate.models.family import family_of


def load_official(path: Path) -> list[dict[str, torch.Tensor]]:
    """The per-stage state dicts of an official checkpoint (`model_stages`, else split from `model`'s
    `stages.<i>.` keys)."""
    if not path.is_file():
        raise UserError(f"import: {path} not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"import: {path} is not a checkpoint this loads safely (weights only): {first}") from None
    if not isinstance(obj, dict):
        raise UserError(f"import: {path} holds a {type(obj).__name__}, not the official code's checkpoint dict")
    stages = obj.get("model_stages")
    if stages is None and isinstance(obj.get("model"), dict):  # older files: the stages share the model's tensors
        split: dict[int, dict] = {}
        for k, v in obj["model"].items():
            if k.startswith("stages."):
                i, _, rest = k[len("stages."):].partition(".")
                split.setdefault(int(i), {})[rest] = v
        stages = [split[i] for i in sorted(split)] if split else None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise UserError(f"import: {path} has no `model_stages` (a list of per-stage state dicts)")
    return stages


def blocks_per_stage(stages: list[dict]) -> list[int]:
    return [len({k.split(".")[1] for k in s if k.startswith("blocks.")}) for s in stages]


def classify(counts: list[int], target: list[int], meta_depth: int) -> tuple[str, int | None]:
    """("meta" | "stage" | "model", stage index of a stage file) from the blocks per stage of a file."""
    K = len(target)
    if len(counts) != K:
        raise UserError(f"import: the file has {len(counts)} stages but the run's model has K={K}")
    if counts == [meta_depth] * K:
        return "meta", None
    if counts == target:
        return "model", None
    grown = [i for i in range(K) if counts[i] == target[i] and counts[i] != meta_depth]
    if len(grown) == 1 and all(counts[i] == meta_depth for i in range(K) if i != grown[0]):
        return "stage", grown[0]
    raise UserError(f"import: blocks per stage {counts} match neither the meta model ({[meta_depth] * K}), the target "
                    f"({target}) nor one incubated module: is --recipe the file's model?")


def _load_stage(module: torch.nn.Module, state: dict, path: Path, i: int) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise UserError(f"{path}: stage {i} does not fit the run's model: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}, other shapes {shapes[:3]}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _write(phase, tensors: dict, path: Path, extra: dict | None = None) -> Path:
    out = phase.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = phase.save_output(tensors)
    ckpt.atomic_write_json(out / "config_key.json", json.loads(json.dumps(phase.config_key(), default=str)))
    ckpt.atomic_write_json(out / "run.json", {
        "phase": phase.name, "imported_from": str(path.resolve()), "imported_sha256": ckpt.sha256_file(path),
        "device_seconds": 0.0, "wall_seconds": 0.0, "device_name": "imported", "world_size": 1, "epochs": 0,
        "images_processed": 0, "final": {}, **(extra or {})})
    ckpt.write_manifest(out, files + ["run.json", "config_key.json"], {"imported_from": str(path.resolve())})
    return out


def import_file(path: Path, cfg, root: Path, as_: str | None = None) -> Path:
    """Write `path` as the output of the phase it corresponds to under `root`; returns that directory. The class
    count is model.num_classes, else the rows of the file's head."""
    path, root = Path(path), Path(root)
    stages = load_official(path)
    key = f"{family_of(cfg.model).classifier_name}.weight"  # the classifier's rows: the class count
    head = stages[-1].get(key)
    num_classes = cfg.model.num_classes or (int(head.shape[0]) if head is not None and head.ndim == 2 else None)
    if not num_classes:
        raise UserError(f"import: {path} has no {key} in its last stage; set model.num_classes")
    meta_phase = phases.make("meta", cfg, root, num_classes, resolve=False)
    target = meta_phase.depths()
    kind, index = classify(blocks_per_stage(stages), target, cfg.model.meta_depth_per_stage)
    if as_ and kind != "model":
        raise UserError(f"import: --as {as_} is for whole models; {path} is a {kind} file")
    phase, tensors, extra = _convert(kind, index, stages, cfg, root, num_classes, path, as_)
    if ckpt.complete(phase.out_dir):
        raise UserError(f"import: {phase.out_dir} already holds a finished {phase.label}; use another --output")
    root.mkdir(parents=True, exist_ok=True)  # only now: a file that does not fit leaves nothing behind
    if not (root / "config.json").is_file():
        cfg.save(root / "config.json")  # later phases of this run read it
    return _write(phase, tensors, path, extra)


def _convert(kind, index, stages, cfg, root, num_classes, path, as_):
    """(the phase whose output this is, its tensors under the phase's names, extra run.json fields)."""
    if kind == "meta":
        model = phases.build_meta_model(cfg, num_classes)
        for i, (stage, state) in enumerate(zip(model.stages, stages)):
            _load_stage(stage, state, path, i)
        return phases.make("meta", cfg, root, num_classes, resolve=False), dict(model.state_dict()), {}
    if kind == "stage":
        phase = phases.make("incubate", cfg, root, num_classes, index, resolve=False)
        model = phase.target()
        _load_stage(model.stages[index], stages[index], path, index)
        # the module was incubated in the meta model this file also holds; name it when it is the run's own
        phase.meta_sha = None
        if ckpt.complete(RunLayout(root).meta.parent):
            meta_file, sha = phases.meta_checkpoint(cfg, root, num_classes)
            run_meta, _ = ckpt.load_tensors(meta_file)
            if all(f"stages.{i}.{k}" in run_meta and torch.equal(run_meta[f"stages.{i}.{k}"], v.float())
                   for i, s in enumerate(stages) if i != index
                   for k, v in s.items()):
                phase.meta_sha = sha
        tensors = {f"stages.{index}.{k}": v for k, v in model.stages[index].state_dict().items()}
        return phase, tensors, {"stage_index": index}
    name = as_ or "finetune"
    phase = phases.make(name, cfg, root, num_classes, resolve=False)
    model = phase.target()
    for i, (stage, state) in enumerate(zip(model.stages, stages)):
        _load_stage(stage, state, path, i)
    return phase, dict(model.state_dict()), {}


def _timm_tensors(source: Path) -> dict[str, torch.Tensor]:
    """A whole trained model under timm's key names, from a run directory, a dsincubate model file (stage keys) or a
    timm checkpoint (.safetensors, or .pth/.bin loaded weights-only, possibly under "model"/"state_dict")."""
    from dsincubate.models import staged

    if source.is_dir():
        layout = RunLayout(source)
        found = [layout.model(n) for n in ("finetune", "e2e") if ckpt.complete(layout.model(n).parent)]
        if not found:
            raise UserError(f"model.meta_init: {source} holds no finished fine-tuned or E2E model")
        source = found[0]
    if not source.is_file():
        raise UserError(f"model.meta_init: {source} not found")
    if source.suffix == ".safetensors":
        tensors, header = ckpt.load_tensors(source)
        if "stage_depths" in header:  # a dsincubate whole model: stages.<i>.<stage-local key>
            offsets = [sum(header["stage_depths"][:i]) for i in range(len(header["stage_depths"]))]
            out = {}
            for i, off in enumerate(offsets):
                local = {k[len(f"stages.{i}."):]: v for k, v in tensors.items() if k.startswith(f"stages.{i}.")}
                out.update(staged.stage_to_timm_keys(local, off))
            return out
        return tensors
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"model.meta_init: {source} does not load weights-only ({str(e).splitlines()[0]})") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.meta_init: {source} is not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def meta_from_model(cfg, num_classes: int, source: str | Path) -> dict[str, torch.Tensor]:
    """The meta model's state dict (`stages.<i>.` keys) built from a trained model of the same width: meta stage i
    takes the last `meta_depth_per_stage` blocks of target stage i, stage 0 the patch embedding, class and position
    tokens, the last stage the final norm and head. Loaded strictly: another width or class count is refused."""
    tensors = _timm_tensors(Path(source))
    depths = phases.make("meta", cfg, "/nonexistent", num_classes, resolve=False).depths()
    d = cfg.model.meta_depth_per_stage
    if min(depths) < d:
        raise UserError(f"model.meta_init: stage depths {depths} are shorter than meta_depth_per_stage={d}")
    meta = phases.build_meta_model(cfg, num_classes)
    for i, stage in enumerate(meta.stages):
        first = sum(depths[:i + 1]) - d  # the last d blocks of target stage i
        state = {}
        for k in stage.state_dict():
            if k.startswith("blocks."):
                j, rest = k[len("blocks."):].split(".", 1)
                state[k] = tensors.get(f"blocks.{first + int(j)}.{rest}")
            else:
                state[k] = tensors.get(k)
        absent = [k for k, v in state.items() if v is None]
        if absent:
            raise UserError(f"model.meta_init: {source} lacks {absent[:4]} (not a model of this architecture?)")
        _load_stage(stage, state, Path(source), i)
    return dict(meta.state_dict())

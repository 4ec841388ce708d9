"""Assembling the K incubated stages (paper Alg. 1, line 7) and exporting a timm-compatible model.

`assemble` reads one stage file per module (by default `<run>/incubate/module_<i>/stage.safetensors`, or an explicit
list when the jobs ran on different machines and their files were collected), checks that they cover 0..K-1 exactly
once and agree on the target spec, K, stage depths and meta model (hash), and writes `<run>/assemble/model.safetensors`.
`export` writes the final model (fine-tuned, or E2E) with timm's own parameter names, next to `model.json` holding the
`timm.create_model` arguments and `config.json` in timm's own format, so every way timm loads local weights gives the
trained model, head included (timm drops a pretrained head whose class count differs from the pretrained_cfg's, so
the class count travels in both files). A model timm cannot build (a V-MoE, a CIFAR ResNet: the family's
`timm_native` is false) gets its spec in `model.json` instead, which `family.build` rebuilds:

    timm.create_model("local-dir:<run>/export/finetune", pretrained=True)                 # config.json
    timm.create_model(**json.load(open(".../model.json")), pretrained=True)              # pretrained_cfg_overlay
    timm.create_model(name, num_classes=N, checkpoint_path=".../model.safetensors")       # timm's load_checkpoint
"""
from __future__ import annotations

import time
from pathlib import Path

from dsincubate import checkpoint as ckpt
from dsincubate.errors import UserError
from dsincubate.models import family, staged
from dsincubate.models.family import ModelSpec
from dsincubate.layout import MODEL_FILE, STAGE_FILE, RunLayout


def default_stage_files(root: Path, num_stages: int, method: str = "incubate") -> list[Path]:
    files = []
    for i in range(num_stages):
        d = RunLayout(root).phase_dir(method, i)
        if not ckpt.complete(d):
            raise UserError(f"{'incubated' if method == 'incubate' else 'm2mKD'} module {i} missing or incomplete: "
                            f"{d / STAGE_FILE} (run `dsincubate {method} --module {i}`)")
        files.append(d / STAGE_FILE)
    return files


def check_stage_set(files: list[Path]) -> list[tuple[Path, dict]]:
    """Validate a set of stage files; returns them ordered by stage index. Errors name the offending file."""
    if not files:
        raise UserError("assemble: no stage files given")
    headers = [(Path(f), ckpt.read_meta(f)) for f in files]
    for f, h in headers:
        if h.get("kind") != "stage":
            raise UserError(f"assemble: {f} is not an incubated stage file (kind={h.get('kind')!r})")
    ref_file, ref = headers[0]
    K = ref["num_stages"]
    by_index: dict[int, Path] = {}
    for f, h in headers:
        for key, what in (("spec", "target model"), ("num_stages", "K"), ("stage_depths", "stage depths"),
                          ("meta_sha256", "meta model")):
            if h.get(key) != ref.get(key):
                raise UserError(f"assemble: {f} has another {what} than {ref_file} ({h.get(key)} vs {ref.get(key)})")
        i = h["stage_index"]
        if i in by_index:
            raise UserError(f"assemble: {f} and {by_index[i]} are both module {i}")
        if not 0 <= i < K:
            raise UserError(f"assemble: {f} is module {i}, outside 0..{K - 1}")
        by_index[i] = f
    missing = [i for i in range(K) if i not in by_index]
    if missing:
        raise UserError(f"assemble: no stage file for module(s) {missing} of K={K}")
    order = {f: h for f, h in headers}
    return [(by_index[i], order[by_index[i]]) for i in range(K)]


def assemble(root: Path, files: list[Path] | None = None, num_stages: int | None = None, dry_run: bool = False,
             method: str = "incubate") -> Path:
    """Join the stage files (default: the run's modules of `method`, incubate or m2mkd) into one model."""
    root = Path(root)
    if files is None:
        files = default_stage_files(root, num_stages, method)
    ordered = check_stage_set(files)
    out = RunLayout(root).assemble_dir_of(method)
    if dry_run:
        return out / MODEL_FILE
    t0 = time.time()
    head = ordered[0][1]
    model = family.build_staged(ModelSpec.from_json(head["spec"]), head["stage_depths"])
    for i, (f, _) in enumerate(ordered):
        tensors, _ = ckpt.load_tensors(f)
        missing, unexpected = model.stages[i].load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise UserError(f"assemble: {f} does not fit stage {i}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta = {"kind": "assembled", "spec": head["spec"], "num_stages": head["num_stages"],
            "stage_depths": head["stage_depths"], "meta_sha256": head["meta_sha256"],
            "stages": [{"file": str(f), "sha256": ckpt.sha256_file(f)} for f, _ in ordered]}
    ckpt.save_tensors(out / MODEL_FILE, model.state_dict(), meta)
    ckpt.atomic_write_json(out / "run.json", {"phase": "assemble", "wall_seconds": time.time() - t0,
                                              "device_seconds": 0.0, "stages": meta["stages"]})
    ckpt.write_manifest(out, [MODEL_FILE, "run.json"], {"phase": "assemble"})
    return out / MODEL_FILE


def export(root: Path, source: str = "finetune", dry_run: bool = False) -> Path:
    """Write `<root>/export/<source>/model.safetensors` with timm keys and `model.json` with the create args."""
    src = RunLayout(root).model(source)
    if not ckpt.complete(src.parent):
        raise UserError(f"export: {src} missing or incomplete (run `dsincubate {source}` first)")
    if dry_run:
        return RunLayout(root).export_dir(source) / MODEL_FILE
    tensors, header = ckpt.load_tensors(src)
    spec = ModelSpec.from_json(header["spec"])
    spec = ModelSpec(spec.timm_name, dict(spec.kwargs, drop_path_rate=0.0))
    model = family.build_staged(spec, header["stage_depths"])
    model.load_state_dict(tensors, strict=True)
    out, fam = RunLayout(root).export_dir(source), family.family_of(spec)
    ckpt.save_tensors(out / MODEL_FILE, staged.timm_state_dict(model, fam.block_prefix),
                      {"kind": "timm", "spec": spec.to_json()})
    cfg = pretrained_cfg(spec)
    # timm cannot take a LayerNorm eps as an argument (the official ViT-H's 1e-5): config.json records it for the user
    args = fam.create_args(spec)
    if not fam.timm_native(spec):  # its spec rebuilds it (a V-MoE: every expert in the file)
        extra = {"moe": spec.kwargs["moe"]} if spec.kwargs.get("moe") else {}
        ckpt.atomic_write_json(out / "model.json", {"model_name": spec.timm_name, **args, **extra,
                                                    "spec": spec.to_json(), "load_with": LOAD_HINT})
        ckpt.write_manifest(out, [MODEL_FILE, "model.json"], {"source": str(src)})
        return out / MODEL_FILE
    ckpt.atomic_write_json(out / "model.json", {"model_name": spec.timm_name, **args, "pretrained_cfg_overlay":
                                                dict(cfg, file=str((out / MODEL_FILE).resolve()))})
    model_args = {k: v for k, v in args.items() if k != "num_classes"}
    eps = {"layer_norm_eps": spec.kwargs["norm_eps"]} if "norm_eps" in spec.kwargs else {}  # timm ignores it
    width = fam.boundary_width(spec, len(header["stage_depths"]) - 1)  # the head's input
    ckpt.atomic_write_json(out / "config.json", {"architecture": spec.timm_name, "num_classes": cfg["num_classes"],
                                                 "num_features": width, "model_args": model_args,
                                                 "pretrained_cfg": cfg, **eps})
    ckpt.write_manifest(out, [MODEL_FILE, "model.json", "config.json"], {"source": str(src)})
    return out / MODEL_FILE


LOAD_HINT = ("dsincubate.models.family.build(dsincubate.models.family.ModelSpec.from_json(model_json['spec']))"
             ".load_state_dict(safetensors.torch.load_file('model.safetensors'))")


def pretrained_cfg(spec: ModelSpec) -> dict:
    """timm's pretrained_cfg for an exported model: its class count (so timm keeps the trained head) and the
    preprocessing the project's eval used (bicubic resize to img_size / crop_pct, center crop, ImageNet mean/std)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from dsincubate.data.transforms import DEFAULT_CROP_PCT

    size = int(spec.kwargs.get("img_size", 224))
    return {"num_classes": int(spec.kwargs["num_classes"]), "input_size": [3, size, size], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": DEFAULT_CROP_PCT, "crop_mode": "center",
            "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
            "first_conv": "patch_embed.proj", "classifier": family.family_of(spec).classifier_name}

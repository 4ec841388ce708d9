"""The phases of Deep Incubation (paper Alg. 1) and the E2E baseline, as small objects for the one training loop.

Each training phase builds its model (loading what earlier phases handed over), names its trainable part (whatever
has `requires_grad`), computes its loss and says what it saves. `dsincubate.engine.run_phase` does everything else,
identically for all of them, which is what keeps the E2E comparison fair.

    meta       pre-train the meta model (K stages of `meta_depth_per_stage` blocks)            -> meta/model.safetensors
    incubate   train target stage I inside the frozen meta model                              -> incubate/module_I/stage.safetensors
    finetune   fine-tune the assembled target (see dsincubate.assemble)                       -> finetune/model.safetensors
    e2e        train the same target whole, from scratch, same loop and recipe               -> e2e/model.safetensors
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsincubate import checkpoint as ckpt
from dsincubate.config import RunConfig, TrainConfig
from dsincubate.errors import UserError
from dsincubate.models import staged, vit

META_FILE = "model.safetensors"
STAGE_FILE = "stage.safetensors"
MODEL_FILE = "model.safetensors"


class Phase:
    """Base: a phase of a run rooted at `root` (the run's output directory)."""

    name = ""
    output_file = MODEL_FILE

    def __init__(self, cfg: RunConfig, root: Path, num_classes: int, module: int | None = None):
        self.cfg, self.root, self.num_classes, self.module = cfg, Path(root), num_classes, module

    @property
    def train_cfg(self) -> TrainConfig:
        return self.cfg.train_config(self.name)

    @property
    def out_dir(self) -> Path:
        return self.root / self.name

    @property
    def label(self) -> str:
        return self.name if self.module is None else f"{self.name}[{self.module}]"

    def target_spec(self, drop_path: float | None = None) -> vit.ModelSpec:
        dp = self.train_cfg.drop_path if drop_path is None else drop_path
        return vit.target_spec(self.cfg.model, self.num_classes, dp)

    def depths(self) -> list[int]:
        return vit.stage_depths(self.cfg.model, self.target_spec().depth)

    def config_key(self) -> dict:
        """The part of the run config this phase's output depends on (a changed one must not resume into it)."""
        d = self.cfg.to_dict()
        return {k: d[k] for k in ("seed", "ds_config", "model", "data", self.name)}

    def check_inputs(self) -> None:
        """Cheap checks before any heavy work; raise UserError."""
        self.depths()

    def build_model(self, load: bool = True) -> nn.Module:
        raise NotImplementedError

    def loss(self, output, targets: torch.Tensor, criterion) -> torch.Tensor:
        return criterion(output.float(), targets)

    def output_names(self, model: nn.Module) -> list[str]:
        """Parameter names (in `model`) saved as this phase's result."""
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def save_output(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        meta = {"kind": self.name, "spec": self.target_spec(0.0).to_json(), "num_stages": self.cfg.model.num_stages,
                "stage_depths": self.depths()}
        ckpt.save_tensors(self.out_dir / self.output_file, tensors, meta)
        return [self.output_file]


class MetaPhase(Phase):
    name = "meta"

    def meta_spec(self) -> vit.ModelSpec:
        return vit.meta_spec(self.cfg.model, self.target_spec(0.0), self.train_cfg.drop_path)

    def build_model(self, load: bool = True) -> nn.Module:
        K, d = self.cfg.model.num_stages, self.cfg.model.meta_depth_per_stage
        return staged.StagedModel(staged.divide(vit.build(self.meta_spec()), [d] * K))

    def save_output(self, tensors):
        meta = {"kind": "meta", "meta_spec": vit.meta_spec(self.cfg.model, self.target_spec(0.0), 0.0).to_json(),
                "target_spec": self.target_spec(0.0).to_json(), "num_stages": self.cfg.model.num_stages,
                "meta_depth_per_stage": self.cfg.model.meta_depth_per_stage}
        ckpt.save_tensors(self.out_dir / META_FILE, tensors, meta)
        return [META_FILE]


def meta_checkpoint(cfg: RunConfig, root: Path, num_classes: int) -> tuple[Path, str]:
    """The meta model file this run's incubation uses, checked against the run's model; returns (path, sha256)."""
    path = Path(root) / "meta" / META_FILE
    if not ckpt.complete(path.parent):
        raise UserError(f"meta checkpoint missing: {path} (run `dsincubate meta` first, or point --output at a run that has one)")
    header = ckpt.read_meta(path)
    if header.get("kind") != "meta":
        raise UserError(f"{path} is not a meta-model checkpoint")
    have = vit.ModelSpec.from_json(header["meta_spec"])
    want = vit.meta_spec(cfg.model, vit.target_spec(cfg.model, num_classes, 0.0), 0.0)
    if header.get("num_stages") != cfg.model.num_stages:
        raise UserError(f"{path} has K={header.get('num_stages')} stages but the run asks for K={cfg.model.num_stages}")
    if not vit.same_architecture(have, want):
        diff = {k: (have.kwargs.get(k), want.kwargs.get(k)) for k in set(have.kwargs) | set(want.kwargs)
                if k != "drop_path_rate" and have.kwargs.get(k) != want.kwargs.get(k)}
        raise UserError(f"{path} was trained for another model: " + ", ".join(
            f"{k} {a} (checkpoint) vs {b} (run)" for k, (a, b) in sorted(diff.items())))
    sha = ckpt.read_manifest(path.parent)["files"][META_FILE]["sha256"]
    return path, sha


class IncubatePhase(Phase):
    name = "incubate"
    output_file = STAGE_FILE

    @property
    def out_dir(self) -> Path:
        return self.root / "incubate" / f"module_{self.module}"

    def check_inputs(self) -> None:
        K = self.cfg.model.num_stages
        self.depths()
        if self.module is None or not 0 <= self.module < K:
            raise UserError(f"module index {self.module} out of range: K={K}, so 0..{K - 1}")
        self.meta_path, self.meta_sha = meta_checkpoint(self.cfg, self.root, self.num_classes)

    def config_key(self) -> dict:
        return dict(super().config_key(), module=self.module, meta_sha256=self.meta_sha)

    def build_model(self, load: bool = True) -> nn.Module:
        K, d = self.cfg.model.num_stages, self.cfg.model.meta_depth_per_stage
        meta_spec = vit.meta_spec(self.cfg.model, self.target_spec(0.0), 0.0)
        meta_model = staged.StagedModel(staged.divide(vit.build(meta_spec), [d] * K))
        if load:
            tensors, _ = ckpt.load_tensors(self.meta_path)
            meta_model.load_state_dict(tensors, strict=True)
        target_stages = staged.divide(vit.build(self.target_spec()), self.depths())
        return staged.Hybrid(list(meta_model.stages), target_stages[self.module], self.module,
                             imitation=self.train_cfg.imitation)

    def loss(self, output, targets, criterion):
        if isinstance(output, tuple):  # Module Imitation: L1 between target and meta stage outputs
            return F.l1_loss(output[0].float(), output[1].float())
        return criterion(output.float(), targets)

    def output_names(self, model):
        prefix = f"stages.{self.module}."
        return [n for n, _ in model.named_parameters() if n.startswith(prefix)]

    def save_output(self, tensors):
        prefix = f"stages.{self.module}."
        local = {n[len(prefix):]: t for n, t in tensors.items()}
        meta = {"kind": "stage", "spec": self.target_spec(0.0).to_json(), "num_stages": self.cfg.model.num_stages,
                "index": self.module, "stage_depths": self.depths(), "meta_sha256": self.meta_sha,
                "objective": "imitation" if self.train_cfg.imitation else "incubation"}
        ckpt.save_tensors(self.out_dir / STAGE_FILE, local, meta)
        return [STAGE_FILE]


class FinetunePhase(Phase):
    name = "finetune"

    def check_inputs(self) -> None:
        self.depths()
        path = self.root / "assemble" / MODEL_FILE
        if not ckpt.complete(path.parent):
            raise UserError(f"assembled model missing: {path} (run `dsincubate assemble` first)")
        header = ckpt.read_meta(path)
        if not vit.same_architecture(vit.ModelSpec.from_json(header["spec"]), self.target_spec(0.0)):
            raise UserError(f"{path} holds another model than this run's target")
        self.assembled_path = path

    def build_model(self, load: bool = True) -> nn.Module:
        model = staged.StagedModel(staged.divide(vit.build(self.target_spec()), self.depths()))
        if load:
            tensors, _ = ckpt.load_tensors(self.assembled_path)
            model.load_state_dict(tensors, strict=True)
        return model


class E2EPhase(Phase):
    name = "e2e"

    def build_model(self, load: bool = True) -> nn.Module:
        return staged.StagedModel(staged.divide(vit.build(self.target_spec()), self.depths()))


PHASES = {"meta": MetaPhase, "incubate": IncubatePhase, "finetune": FinetunePhase, "e2e": E2EPhase}


def make(name: str, cfg: RunConfig, root: Path, num_classes: int, module: int | None = None) -> Phase:
    return PHASES[name](cfg, root, num_classes, module)

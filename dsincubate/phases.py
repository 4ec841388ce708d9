"""The phases of Deep Incubation (paper Alg. 1), the E2E baseline and its tuned control, as small objects.

`make(name, cfg, root, num_classes, stage_index)` returns a ready phase: its inputs (checkpoints of earlier phases)
are checked and resolved once, so the one training loop (`dsincubate.trainer.run_phase(phase, ctx, info)`) only
asks it what `dsincubate.phase_base.Phase` declares (build its model, name its trainable part, compute its loss, save
its result).

    phase           what it trains                                               its output (under the run root)
    meta            the meta model (K stages of `meta_depth_per_stage` blocks)   meta/model.safetensors
    incubate        target stage I inside the meta model (fixed; tunable/random)  incubate/module_I/stage.safetensors
    finetune        the assembled target (see dsincubate.assemble)               finetune/model.safetensors
    e2e             the same target whole, from scratch, same loop and recipe    e2e/model.safetensors
    e2e_tune        the E2E model further with the fine-tune recipe (control)    e2e_tune/model.safetensors
    m2mkd           teacher module I distilled into student module I (m2mkd.py)  m2mkd/module_I/stage.safetensors
    m2mkd_finetune  the assembled students end to end                            m2mkd/finetune/model.safetensors

Under ZeRO-3 (`Phase.build_model_zero3`) incubation builds the meta model and target stage I only
(`family.stage_only`; a ViT's from a model of stage I's depth: same architecture, the target's drop-path rates for
those blocks), so its initial values differ from the stage I of a whole-target build used without ZeRO-3. Every
model is built through the model-family seam (`dsincubate.models.family`): nothing here reads an attribute of one
architecture.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsincubate import checkpoint as ckpt
from dsincubate.config import RunConfig
from dsincubate.errors import UserError
from dsincubate.layout import META_FILE, STAGE_FILE, RunLayout
from dsincubate.models import family, staged
from dsincubate.models.family import ModelSpec
from dsincubate.phase_base import Phase, persistent_buffers


def meta_spec(cfg: RunConfig, num_classes: int, drop_path: float = 0.0) -> ModelSpec:
    target = family.target_spec(cfg.model, num_classes, 0.0)
    return family.family_of(target).meta_spec(cfg.model, target, drop_path)


def build_meta_model(cfg: RunConfig, num_classes: int, drop_path: float = 0.0) -> staged.StagedModel:
    K, d = cfg.model.num_stages, cfg.model.meta_depth_per_stage
    return family.build_staged(meta_spec(cfg, num_classes, drop_path), [d] * K)


class MetaPhase(Phase):
    name = "meta"

    def config_key(self) -> dict:
        key = super().config_key()  # the meta model is dense: a V-MoE target's MoE settings do not change it
        key["model"] = {k: v for k, v in key["model"].items() if not k.startswith("moe_")}
        return key

    def resolve_inputs(self) -> None:
        super().resolve_inputs()
        init = self.cfg.model.meta_init
        if init and not Path(init).exists():
            raise UserError(f"model.meta_init: {init} not found (a run directory or a model file)")

    def build_model(self, load: bool = True) -> nn.Module:
        model = build_meta_model(self.cfg, self.num_classes, self.train_cfg.drop_path)
        if load and self.cfg.model.meta_init:  # supplementary Sec. 3: a meta model from a trained model
            model.load_state_dict(self._init_tensors(), strict=True)
        return model

    def _init_tensors(self) -> dict[str, torch.Tensor]:
        from dsincubate.importer import meta_from_model

        return meta_from_model(self.cfg, self.num_classes, self.cfg.model.meta_init)

    def _construct_zero3(self):
        model = build_meta_model(self.cfg, self.num_classes, self.train_cfg.drop_path)
        return model, ([(model, self._init_tensors())] if self.cfg.model.meta_init else [])

    def save_output(self, tensors):
        meta = {"kind": "meta", "meta_spec": meta_spec(self.cfg, self.num_classes).to_json(),
                "target_spec": self.target_spec(0.0).to_json(), "num_stages": self.cfg.model.num_stages,
                "meta_depth_per_stage": self.cfg.model.meta_depth_per_stage}
        ckpt.save_tensors(self.out_dir / META_FILE, tensors, meta)
        return [META_FILE]


def meta_checkpoint(cfg: RunConfig, root: Path, num_classes: int) -> tuple[Path, str]:
    """The meta model file this run's incubation uses, checked against the run's model; returns (path, sha256)."""
    path = RunLayout(root).meta
    if not ckpt.complete(path.parent):
        raise UserError(f"meta checkpoint missing: {path} (run `dsincubate meta` first, or point --output at a run "
                        "that has one)")
    header = ckpt.read_meta(path)
    if header.get("kind") != "meta":
        raise UserError(f"{path} is not a meta-model checkpoint")
    have = ModelSpec.from_json(header["meta_spec"])
    want = meta_spec(cfg, num_classes)
    if header.get("num_stages") != cfg.model.num_stages:
        raise UserError(f"{path} has K={header.get('num_stages')} stages but the run asks for K={cfg.model.num_stages}")
    if not family.same_architecture(have, want):
        diff = {k: (have.kwargs.get(k), want.kwargs.get(k)) for k in set(have.kwargs) | set(want.kwargs)
                if k != "drop_path_rate" and have.kwargs.get(k) != want.kwargs.get(k)}
        raise UserError(f"{path} was trained for another model: " + ", ".join(
            f"{k} {a} (checkpoint) vs {b} (run)" for k, (a, b) in sorted(diff.items())))
    sha = ckpt.read_manifest(path.parent)["files"][META_FILE]["sha256"]
    return path, sha


class IncubatePhase(Phase):
    name = "incubate"
    meta_path: Path | None = None
    meta_sha: str | None = None

    def resolve_inputs(self) -> None:
        K = self.cfg.model.num_stages
        self.depths()
        if self.stage_index is None or not 0 <= self.stage_index < K:
            raise UserError(f"module index {self.stage_index} out of range: K={K}, so 0..{K - 1}")
        if self.train_cfg.meta_model != "random":  # the random-init ablation needs no meta model
            self.meta_path, self.meta_sha = meta_checkpoint(self.cfg, self.layout.root, self.num_classes)

    def config_key(self) -> dict:
        return dict(super().config_key(), stage_index=self.stage_index, meta_sha256=self.meta_sha)

    def build_model(self, load: bool = True) -> nn.Module:
        meta_model = build_meta_model(self.cfg, self.num_classes)
        if load and self.meta_path is not None:
            tensors, _ = ckpt.load_tensors(self.meta_path)
            meta_model.load_state_dict(tensors, strict=True)
        return self._hybrid(meta_model, list(self.target().stages)[self.stage_index])

    def _hybrid(self, meta_model: staged.StagedModel, target_stage: staged.Stage) -> staged.Hybrid:
        """Paper Eq. 3; with a meta model of another width, stitches enter and leave the target stage."""
        tc, i, K = self.train_cfg, self.stage_index, self.cfg.model.num_stages
        meta, target = meta_spec(self.cfg, self.num_classes), self.target_spec()
        fam = family.family_of(target)
        stitch_in = stitch_out = None
        if i > 0:  # the widths entering stage i: meta stage i-1's output, target stage i's input
            w_meta, w = fam.boundary_width(meta, i - 1), fam.boundary_width(target, i - 1)
            stitch_in = staged.Stitch(w_meta, w) if w_meta != w else None
        if i < K - 1:
            w_meta, w = fam.boundary_width(meta, i), fam.boundary_width(target, i)
            stitch_out = staged.Stitch(w, w_meta) if w_meta != w else None
        return staged.Hybrid(list(meta_model.stages), target_stage, i, imitation=tc.imitation,
                             freeze_meta=tc.meta_model == "fixed", stitch_in=stitch_in, stitch_out=stitch_out)

    def target_stage_only(self) -> staged.Stage:
        """Target stage I alone, from a model of stage I's depth (its embedding or head kept only when stage I has
        them): the blocks get the whole target's drop-path rates for their positions."""
        tc, depths, i, spec = self.train_cfg, self.depths(), self.stage_index, self.target_spec()
        stage = family.family_of(spec).stage_only(spec, depths, i)
        family.apply_drop_path(spec, [stage], tc.drop_path, tc.drop_path_mode, sum(depths[:i]), sum(depths))
        return stage

    def _construct_zero3(self):
        meta_model = build_meta_model(self.cfg, self.num_classes)
        model = self._hybrid(meta_model, self.target_stage_only())
        return model, ([(meta_model, self.meta_path)] if self.meta_path is not None else [])

    def loss(self, output, targets, criterion):
        if isinstance(output, staged.Paired):  # Module Imitation: L1 to the meta stage's output
            return {"loss": F.l1_loss(output.trained.float(), output.reference.float())}
        return {"loss": criterion(output.float(), targets)}

    def output_names(self, model):
        prefix = f"stages.{self.stage_index}."
        return [n for n, _ in model.named_parameters() if n.startswith(prefix)] + persistent_buffers(model, prefix)

    def save_output(self, tensors):
        prefix = f"stages.{self.stage_index}."
        local = {n[len(prefix):]: t for n, t in tensors.items()}
        objective = "m2mkd" if self.name == "m2mkd" else "imitation" if self.train_cfg.imitation else "incubation"
        meta = {"kind": "stage", "spec": self.target_spec(0.0).to_json(), "num_stages": self.cfg.model.num_stages,
                "stage_index": self.stage_index, "stage_depths": self.depths(), "meta_sha256": self.meta_sha,
                "objective": objective, "meta_model": self.train_cfg.meta_model}
        ckpt.save_tensors(self.out_dir / STAGE_FILE, local, meta)
        return [STAGE_FILE]


class _FromModel(Phase):
    """A phase that starts from a whole target model an earlier step wrote (`source`)."""

    source = ""
    source_path: Path | None = None
    source_size: int | None = None

    def resolve_inputs(self) -> None:
        self.depths()
        path = self.layout.model(self.source)
        if not ckpt.complete(path.parent):
            how = "assemble --method m2mkd" if self.source == "m2mkd_assemble" else self.source
            raise UserError(f"{self.source} model missing: {path} (run `dsincubate {how}` first)")
        header = ckpt.read_meta(path)
        have, want = ModelSpec.from_json(header["spec"]), self.target_spec(0.0)
        self.source_size = int(have.kwargs["img_size"])  # a high-resolution fine-tune starts from another size
        same_but_size = ModelSpec(have.timm_name, dict(have.kwargs, img_size=want.kwargs["img_size"]))
        if not family.same_architecture(same_but_size, want):
            raise UserError(f"{path} holds another model than this run's target")
        self.source_path = path

    def source_tensors(self) -> dict[str, torch.Tensor]:
        """The earlier model's tensors, moved to this phase's resolution if it differs (a ViT's position embedding
        resampled; the family says what depends on the resolution)."""
        tensors, _ = ckpt.load_tensors(self.source_path)
        if self.source_size is not None and self.source_size != self.img_size:
            spec = self.target_spec()
            tensors = family.family_of(spec).resample(tensors, spec, self.source_size, self.img_size)
        return tensors

    def build_model(self, load: bool = True) -> nn.Module:
        from dsincubate.models import moe

        model = self.target()
        if load:  # a V-MoE built expert-parallel holds only its rank's experts of the file's
            model.load_state_dict(moe.localize(self.source_tensors(), moe.current_ep()), strict=True)
        return model

    def _construct_zero3(self):
        model = self.target()
        if self.source_path is None:
            return model, []
        # resampled: the tensors, not the file, are what fits (source_size is None when set by hand: the same size)
        resampled = self.source_size is not None and self.source_size != self.img_size
        return model, [(model, self.source_tensors() if resampled else self.source_path)]


class FinetunePhase(_FromModel):
    name = "finetune"
    source = "assemble"


class E2ETunePhase(_FromModel):
    """The paper's "E2E training + tuning" control: E2E gets fine-tune's extra epochs too."""

    name = "e2e_tune"
    source = "e2e"


class E2EPhase(Phase):
    name = "e2e"

    def build_model(self, load: bool = True) -> nn.Module:
        return self.target()


def make(name: str, cfg: RunConfig, root: Path, num_classes: int, stage_index: int | None = None,
         resolve: bool = True) -> Phase:
    """A ready phase (its class from `dsincubate.registry`). `resolve=False` skips locating earlier phases' outputs
    (tune and benchmarks build the architecture only, with `build_model(load=False)`)."""
    from dsincubate import registry

    phase = registry.phase_class(name)(cfg, root, num_classes, stage_index)
    if resolve:
        phase.resolve_inputs()
    elif registry.phase(name).per_stage and (stage_index is None or not 0 <= stage_index < cfg.model.num_stages):
        raise UserError(f"module index {stage_index} out of range: K={cfg.model.num_stages}")
    return phase

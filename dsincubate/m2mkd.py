"""m2mKD (Lo et al., the follow-up of Deep Incubation) as two phases on top of incubation's: distilling module I of
a trained monolithic teacher into student module I through the frozen meta model, and training the assembled
students end to end. Registered in `dsincubate.registry` (`phases.make("m2mkd", ..., stage_index=I)`).

    m2mkd           student module I, loss (1 - a) CE(s, y) + a t^2 KL(t || s)      -> m2mkd/module_I/stage.safetensors
    m2mkd_finetune  the assembled students (assemble --method m2mkd) end to end     -> m2mkd/finetune/model.safetensors

    dsincubate m2mkd --module 0 --recipe demo --output runs/kd --set m2mkd.teacher=runs/teacher/e2e/model.safetensors
"""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn

from dsincubate import checkpoint as ckpt
from dsincubate.errors import UserError
from dsincubate.models import family, staged
from dsincubate.models.family import ModelSpec
from dsincubate.phase_base import persistent_buffers
from dsincubate.phases import IncubatePhase, _FromModel, meta_spec


def teacher_spec(cfg, num_classes: int, path: Path) -> tuple[ModelSpec, list[int]]:
    """The teacher file's model spec and stage depths, checked against the run (raises UserError): a whole
    dsincubate model, at the meta model's width, with the run's classes and K modules. Reads the header only."""
    header = ckpt.read_meta(path)
    spec = header.get("spec")
    if not spec or header.get("stage_depths") is None:
        raise UserError(f"m2mkd teacher {path} is not a whole dsincubate model (kind {header.get('kind')!r})")
    have = ModelSpec.from_json(spec)
    meta = meta_spec(cfg, num_classes)
    fam, fam_meta = family.family_of(have), family.family_of(meta)
    w, w_meta = fam.boundary_width(have, 0), fam_meta.boundary_width(meta, 0)
    if fam is not fam_meta or w != w_meta or int(have.kwargs["num_classes"]) != num_classes:
        raise UserError(f"m2mkd teacher {path} ({fam.name}, width {w}, {have.kwargs['num_classes']} classes) does "
                        f"not fit the meta model ({fam_meta.name}, width {w_meta}, {num_classes} classes): the "
                        "meta model must be at the teacher's width")
    depths = list(header["stage_depths"])
    if len(depths) != cfg.model.num_stages:
        raise UserError(f"m2mkd teacher {path} is divided into {len(depths)} modules, the run into "
                        f"K={cfg.model.num_stages}")
    return have, depths


class M2mkdPhase(IncubatePhase):
    """m2mKD (Lo et al.): student module I learns inside the frozen meta model from the task labels and from teacher
    module I (a trained monolithic model's, divided like the target) through the same meta prefix and tail. Its
    output is a stage file like incubation's, so `assemble --stages m2mkd/module_*/stage.safetensors` joins the
    students and `finetune` trains them end to end."""

    name = "m2mkd"
    teacher_path: Path | None = None

    def resolve_inputs(self) -> None:
        super().resolve_inputs()
        t = self.train_cfg.teacher
        path = self.layout.model(t) if t in ("e2e", "finetune") else Path(t)
        if not ckpt.complete(path.parent) and not (t not in ("e2e", "finetune") and path.is_file()):
            raise UserError(f"m2mkd teacher {t!r}: {path} missing or unfinished (train it first, or give a model file)")
        self.teacher_path = path
        self.teacher_spec, self.teacher_depths = teacher_spec(self.cfg, self.num_classes, path)

    def config_key(self) -> dict:
        return dict(super().config_key(), teacher=str(self.teacher_path) if self.teacher_path else None)

    def teacher_stage(self, load: bool = True) -> staged.Stage:
        teacher = family.build_staged(self.teacher_spec, self.teacher_depths)
        if load:
            tensors, _ = ckpt.load_tensors(self.teacher_path)
            teacher.load_state_dict(tensors, strict=True)
        return teacher.stages[self.stage_index]

    def build_model(self, load: bool = True) -> nn.Module:
        return staged.Distill(super().build_model(load), self.teacher_stage(load and self.teacher_path is not None))

    def _construct_zero3(self):
        """The hybrid as incubation builds it, and teacher stage I alone (never the whole teacher), its weights
        loaded one gathered tensor at a time like the meta model's."""
        from safetensors import safe_open

        hybrid, sources = super()._construct_zero3()
        teacher = family.family_of(self.teacher_spec).stage_only(self.teacher_spec, self.teacher_depths,
                                                                 self.stage_index)
        if self.teacher_path is None:
            return staged.Distill(hybrid, teacher), sources
        prefix = f"stages.{self.stage_index}."
        with safe_open(str(self.teacher_path), framework="pt") as f:
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        return staged.Distill(hybrid, teacher), sources + [(teacher, tensors)]

    def loss(self, output, targets, criterion):
        """(1 - alpha) CE(s, y) + alpha tau^2 KL(softmax(t/tau) || softmax(s/tau)); the KL is summed over batch and
        classes and divided by their product, as the m2mKD code does (so alpha weighs a per-logit mean)."""
        tc = self.train_cfg
        if not isinstance(output, staged.Paired):
            return {"loss": criterion(output.float(), targets)}
        s, t = output.trained.float(), output.reference.float()
        ce = criterion(s, targets)
        kl = F.kl_div(F.log_softmax(s / tc.kd_tau, -1), F.log_softmax(t / tc.kd_tau, -1), reduction="sum",
                      log_target=True) / s.numel()
        return {"loss": (1 - tc.kd_alpha) * ce + tc.kd_alpha * tc.kd_tau ** 2 * kl, "ce": ce.detach(),
                "kd": kl.detach()}

    def output_names(self, model):
        prefix = f"hybrid.stages.{self.stage_index}."
        return [n for n, _ in model.named_parameters() if n.startswith(prefix)] + \
            persistent_buffers(model, prefix)

    def save_output(self, tensors):
        return super().save_output({n[len("hybrid."):]: t for n, t in tensors.items()})


class M2mkdFinetunePhase(_FromModel):
    """The assembled m2mKD students trained end to end (the m2mKD recipe: no warmup, clipping 1.0)."""

    name = "m2mkd_finetune"
    source = "m2mkd_assemble"

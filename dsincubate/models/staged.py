"""Stages of a model, the hybrid of module incubation, and assembling stages back: the algorithm, for any family.

- A `Stage` is a contiguous slice of a model: [embedding] + blocks + [final norm and head]. Its family divides a
  built model into stages (`family.family_of(spec).divide(model, depths)`, or `divide` here) by moving modules (no
  copies, no shared modules, so state dicts hold every tensor once); the family's Stage subclass says what the
  embedding and head compute (`forward_embed` / `forward_head`), so the composition is exactly the family's forward.
- `StagedModel` is the composition (the meta model, the assembled target, the E2E model).
- `Hybrid` is the meta model with stage i replaced by target stage i (paper Eq. 3): meta stages frozen and in eval
  mode; stages before i run under `no_grad` (no graph, no activations kept); stages after i pass gradients to their
  input but, with `requires_grad=False`, compute no weight gradients.
- A training forward that gives more than logits returns a named type, which the losses check by type: `Paired`
  (Module Imitation's target and meta features, m2mKD's student and teacher logits) or `PerModule` (the decoupled
  baselines' K modules' logits and reconstruction losses); `output_tensors` lists any output's tensors.
- `stage_to_timm_keys` / `timm_state_dict` map stage-local keys (`blocks.<local>`) to the whole model's keys (timm's,
  for a timm family), for assembly and export.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from timm.models._manipulate import checkpoint_seq


class Stage(nn.Module):
    """A contiguous slice of a model: [embedding] + blocks + [final norm and head]. `embed` / `head` are the
    (name, module or plain attribute) pairs stage 0 / stage K-1 own, set in that order, so a family keeps its own
    parameter names and order; subclasses compute them in `forward_embed` / `forward_head`."""

    def __init__(self, embed: list, blocks: list, head: list, block_offset: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.block_offset = block_offset
        for name, value in embed if first else ():
            setattr(self, name, value)
        self.blocks = nn.Sequential(*blocks)
        for name, value in head if last else ():
            setattr(self, name, value)
        self.grad_checkpointing = False

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.forward_embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.last:
            x = self.forward_head(x)
        return x

    def classifier(self) -> nn.Module:
        """The final linear layer (last stage only)."""
        raise NotImplementedError

    def input_size(self) -> int:
        """The image side the model was built for (first stage only)."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return set()


def divide(model: nn.Module, depths: list[int]) -> list[Stage]:
    """K stages of `depths` blocks each, by the model's family."""
    from dsincubate.models.family import family_of

    return family_of(model).divide(model, depths)


class StagedModel(nn.Module):
    """The composition M_K o ... o M_1 of K stages."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.{n}" for i, s in enumerate(self.stages) for n in s.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable


class Stitch(nn.Module):
    """LayerNorm + Linear from one width to another: joins a target stage to a meta model of another width
    (supplementary Sec. 3; m2mKD's stitch layers). Trained with the stage, dropped at assembly."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(width_in)
        self.proj = nn.Linear(width_in, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class Paired(NamedTuple):
    """A training forward's output and the frozen reference its loss compares it with: Module Imitation's (target
    stage output, meta stage output on the same input) or m2mKD's (student logits, teacher logits). A NamedTuple, so
    ZeRO-3's hooks on module outputs keep its type."""

    trained: torch.Tensor
    reference: torch.Tensor


class PerModule(NamedTuple):
    """The decoupled baselines' training forward (`dsincubate.decoupled`): the logits of each of the K modules
    (auxiliary classifiers 0..K-2, then the model's own head) and the K-1 decoders' reconstruction losses (InfoPro;
    empty for DGL)."""

    logits: tuple
    recon: tuple = ()


def output_tensors(output) -> list[torch.Tensor]:
    """Every tensor of a forward's output (a tensor, `Paired` or `PerModule`), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Paired):
        return [output.trained, output.reference]
    if isinstance(output, PerModule):
        return [*output.logits, *output.recon]
    raise TypeError(f"a forward returned {type(output).__name__}: a tensor, staged.Paired or staged.PerModule expected")


class Hybrid(nn.Module):
    """Meta model with stage `stage_index` replaced by a target stage; everything but the target stage is frozen.

    With `imitation=True` the training forward returns `Paired(target stage output, meta stage output)` on the same
    input, for the Module Imitation ablation (paper Fig. 2b); the stages after `stage_index` are then not run at all.
    With `freeze_meta=False` (the paper's "tunable meta" ablations) the meta stages train with the target stage.
    With `stitch_in` / `stitch_out` (a meta model of another width) the target stage is entered and left through
    them; they train with it.
    """

    def __init__(self, meta_stages: list[Stage], target_stage: Stage, stage_index: int, imitation: bool = False,
                 freeze_meta: bool = True, stitch_in: Stitch | None = None, stitch_out: Stitch | None = None):
        super().__init__()
        self.stage_index, self.imitation, self.freeze_meta = stage_index, imitation, freeze_meta
        stages = list(meta_stages)
        self.meta_stage = None
        if imitation:
            self.meta_stage = stages[stage_index]  # the stage being imitated: frozen, kept as a teacher
        stages[stage_index] = target_stage
        self.stages = nn.ModuleList(stages)
        self.stitch_in, self.stitch_out = stitch_in, stitch_out
        for p in self.frozen_parameters():
            p.requires_grad_(not freeze_meta)
        if self.meta_stage is not None:  # an imitation teacher is never trained
            for p in self.meta_stage.parameters():
                p.requires_grad_(False)
        for p in self.trained_modules().parameters():
            p.requires_grad_(True)

    @property
    def target_stage(self) -> Stage:
        return self.stages[self.stage_index]

    def trained_modules(self) -> nn.ModuleList:
        """The target stage and its stitches: what incubation always trains."""
        return nn.ModuleList([m for m in (self.stitch_in, self.target_stage, self.stitch_out) if m is not None])

    def frozen_parameters(self):
        seen = {id(p) for p in self.trained_modules().parameters()}
        return [p for p in self.parameters() if id(p) not in seen]

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        if self.stitch_in is not None:
            x = self.stitch_in(x)
        x = self.target_stage(x)
        return self.stitch_out(x) if self.stitch_out is not None else x

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen meta stages stay deterministic (no drop path): the paper fixes the meta model.
        for i, s in enumerate(self.stages):
            if i != self.stage_index and self.freeze_meta:
                s.eval()
        if self.meta_stage is not None:
            self.meta_stage.eval()
        return self

    def forward(self, x: torch.Tensor):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_meta):
            for stage in self.stages[: self.stage_index]:
                x = stage(x)
        if self.imitation and self.training:  # evaluation always measures the hybrid's task accuracy
            with torch.no_grad():
                teacher = self.meta_stage(x)
            return Paired(self._target(x), teacher)
        x = self._target(x)
        for stage in self.stages[self.stage_index + 1:]:
            x = stage(x)
        return x

    def no_weight_decay(self) -> set[str]:
        if not self.freeze_meta:
            return {f"stages.{i}.{n}" for i, s in enumerate(self.stages) for n in s.no_weight_decay()}
        return {f"stages.{self.stage_index}.{n}" for n in self.target_stage.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for i, s in enumerate(self.stages):
            if i == self.stage_index or not self.freeze_meta:
                s.grad_checkpointing = enable


def stage_to_timm_keys(state: dict[str, torch.Tensor], block_offset: int, prefix: str = "blocks") -> dict:
    """Stage-local keys -> whole-model keys: `blocks.<j>.` becomes `blocks.<offset + j>.`; the embedding's and the
    head's keys are already the whole model's."""
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            j, rest = key[len("blocks."):].split(".", 1)
            key = f"{prefix}.{block_offset + int(j)}.{rest}"
        out[key] = value
    return out


def timm_state_dict(model: StagedModel, prefix: str = "blocks") -> dict[str, torch.Tensor]:
    """The state dict of the equivalent whole model (for a ViT: timm's VisionTransformer); `prefix` is the whole
    model's name of the blocks of division (the family's `block_prefix`)."""
    out = {}
    for stage in model.stages:
        out.update(stage_to_timm_keys(stage.state_dict(), stage.block_offset, prefix))
    return out


class Distill(nn.Module):
    """m2mKD's module distillation through the meta model: student stage I and teacher stage I (a trained monolithic
    model's) each between the same frozen meta prefix and tail. Training forward: `Paired(student logits, teacher
    logits)`, the prefix run once; evaluation: the student hybrid's logits. Only the student (and its stitches)
    trains; meta and teacher are frozen and in eval mode."""

    def __init__(self, hybrid: Hybrid, teacher_stage: Stage):
        super().__init__()
        self.hybrid, self.teacher_stage = hybrid, teacher_stage
        for p in teacher_stage.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.hybrid.train(mode)  # keeps the meta stages in eval mode
        self.teacher_stage.eval()
        return self

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.hybrid.stages[self.hybrid.stage_index + 1:]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor):
        h = self.hybrid
        if not self.training:
            return h(x)
        with torch.no_grad():
            for stage in h.stages[: h.stage_index]:
                x = stage(x)
            teacher = self._tail(self.teacher_stage(x))
        return Paired(self._tail(h._target(x)), teacher)

    def no_weight_decay(self) -> set[str]:
        return {f"hybrid.{n}" for n in self.hybrid.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.hybrid.set_grad_checkpointing(enable)

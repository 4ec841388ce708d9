"""The base of every phase: what the one training loop asks of a phase, and building and loading under ZeRO-3.

A phase (`dsincubate.phases`, `dsincubate.m2mkd`, `dsincubate.decoupled`; listed in `dsincubate.registry`) subclasses
`Phase` and answers the training loop's questions (`dsincubate.trainer.run_phase`): `build_model(load)` (its model,
earlier phases' weights loaded), `output_names(model)` (what it trains and saves), `loss(output, targets, criterion)`
(a dict with "loss", timm's task contract; `objective(model, output, ...)` adds a V-MoE's load-balancing loss),
`save_output(tensors)` and `config_key()` (what its output depends on). Everything else is done identically for all
phases, which is what keeps the comparison fair.

Under ZeRO-3 the engine builds through `build_model_zero3(ds_cfg, load)`: the model is constructed inside
`deepspeed.zero.Init` (each submodule partitioned as soon as it exists), timm's initialisation is replayed one module
at a time (`family.init_weights_gathered`: same values as an unsharded build), and earlier phases' weights are loaded
one tensor at a time into gathered parameters (`load_gathered`), so no rank ever holds the whole model.

    class E2EPhase(Phase):
        name = "e2e"                                  # its registry entry's name
        def build_model(self, load=True): return self.target()
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dsincubate import checkpoint as ckpt
from dsincubate.config import RunConfig, TrainConfig
from dsincubate.errors import UserError
from dsincubate.layout import RunLayout
from dsincubate.models import family, staged
from dsincubate.models.family import ModelSpec


class Phase:
    """Base: a phase of the run rooted at `root` (the run's output directory)."""

    name = ""

    def __init__(self, cfg: RunConfig, root: Path, num_classes: int, stage_index: int | None = None):
        self.cfg, self.layout, self.num_classes, self.stage_index = cfg, RunLayout(root), num_classes, stage_index

    @property
    def train_cfg(self) -> TrainConfig:
        return self.cfg.train_config(self.name)

    @property
    def output_file(self) -> str:
        """The file its result goes to (the registry's entry)."""
        from dsincubate import registry

        return registry.phase(self.name).output_file

    @property
    def out_dir(self) -> Path:
        return self.layout.phase_dir(self.name, self.stage_index)

    @property
    def label(self) -> str:
        return self.name if self.stage_index is None else f"{self.name}[{self.stage_index}]"

    @property
    def img_size(self) -> int:
        return int(self.target_spec().kwargs["img_size"])

    def target_spec(self, drop_path: float | None = None) -> ModelSpec:
        dp = self.train_cfg.drop_path if drop_path is None else drop_path
        spec = family.target_spec(self.cfg.model, self.num_classes, dp)
        size = self.train_cfg.img_size  # a high-resolution fine-tune
        if size and size != spec.kwargs["img_size"]:
            spec = family.family_of(spec).with_img_size(spec, size, self.name)
        return spec

    def depths(self) -> list[int]:
        return family.stage_depths(self.cfg.model, self.target_spec())

    def config_key(self) -> dict:
        """The part of the run config this phase's output depends on (a changed one must not resume into it)."""
        from dsincubate import registry

        d = self.cfg.to_dict()  # its recipe is its registry entry's config section (the phase's name for most)
        return {k: d[k] for k in ("seed", "ds_config", "model", "data", registry.phase(self.name).config_section)}

    def resolve_inputs(self) -> None:
        """Check and locate what earlier phases handed over (cheap; raises UserError). Called once by `make`."""
        self.depths()

    def target(self) -> staged.StagedModel:
        """The target model divided into K stages, with this phase's stochastic depth."""
        tc, spec = self.train_cfg, self.target_spec()
        model = family.build_staged(spec, self.depths())
        if tc.drop_path_mode != "linear":  # the build gave the linear schedule
            family.apply_drop_path(spec, model.stages, tc.drop_path, tc.drop_path_mode)
        return model

    def build_model(self, load: bool = True) -> nn.Module:
        raise NotImplementedError

    def build_model_zero3(self, ds_cfg: dict, load: bool = True) -> nn.Module:
        """The model built inside `deepspeed.zero.Init` with `ds_cfg` (ZeRO stage 3): partitioned from the start."""
        import deepspeed

        with family.deferred_init() as built, deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            model, sources = self._construct_zero3()
        for m in built:
            family.init_weights_gathered(m)
        if load:
            for module, path in sources:
                load_gathered(module, path)
        return model

    def _construct_zero3(self) -> tuple[nn.Module, list]:
        """(model, [(submodule, safetensors file to load into it), ...]) without loading anything."""
        return self.build_model(load=False), []

    def loss(self, output, targets: torch.Tensor, criterion) -> dict[str, torch.Tensor]:
        return {"loss": criterion(output.float(), targets)}

    def objective(self, model: nn.Module, output, targets: torch.Tensor, criterion) -> dict[str, torch.Tensor]:
        """What the training step minimises: the phase's loss of `output` (the forward of `model`) plus, for a V-MoE,
        `model.moe_aux_weight` x the load-balancing loss of `model`'s trained MoE layers (reported as "moe_aux").
        The model comes in as an argument: nothing here reads state an engine left on the phase."""
        from dsincubate.models import moe

        losses = self.loss(output, targets, criterion)
        aux = moe.aux_loss(model)
        if aux is not None:
            losses["moe_aux"] = aux.detach()
            losses["loss"] = losses["loss"] + self.cfg.model.moe_aux_weight * aux
        return losses

    def output_names(self, model: nn.Module) -> list[str]:
        """Parameter and buffer names (in `model`) saved as this phase's result: the trained parameters and the
        model's persistent buffers (a ResNet's BatchNorm statistics; a ViT has none)."""
        return [n for n, p in model.named_parameters() if p.requires_grad] + persistent_buffers(model)

    def save_output(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        meta = {"kind": self.name, "spec": self.target_spec(0.0).to_json(), "num_stages": self.cfg.model.num_stages,
                "stage_depths": self.depths()}
        ckpt.save_tensors(self.out_dir / self.output_file, tensors, meta)
        return [self.output_file]


def persistent_buffers(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the buffers a state dict of `model` holds, under `prefix`."""
    out = []
    for name, module in model.named_modules():
        for b, _ in module.named_buffers(recurse=False):
            full = f"{name}.{b}" if name else b
            if b not in module._non_persistent_buffers_set and full.startswith(prefix):
                out.append(full)
    return out


class _Tensors:
    """A dict of tensors with safetensors' reader interface (keys, get_tensor), for `load_gathered`."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self):
        return self.tensors.keys()

    def get_tensor(self, name):
        return self.tensors[name]


def load_gathered(module: nn.Module, path: Path | dict) -> None:
    """Load a safetensors file (or a dict of tensors) into a ZeRO-3 partitioned module (strict): one tensor read and
    gathered at a time, rank 0's copy kept and re-partitioned."""
    import deepspeed
    import torch.distributed as tdist
    from safetensors import safe_open

    names = dict(module.named_parameters())
    # a state dict leaves non-persistent buffers out (a Swin's relative_position_index): the build made them
    persistent = set(persistent_buffers(module))
    buffers = {n: b for n, b in module.named_buffers() if n in persistent}
    with (_Tensors(path) if isinstance(path, dict) else safe_open(str(path), framework="pt")) as f:
        keys = set(f.keys())
        missing, unexpected = (set(names) | set(buffers)) - keys, keys - set(names) - set(buffers)
        if missing or unexpected:
            what = "the initial tensors" if isinstance(path, dict) else path
            raise UserError(f"{what} do not fit the model: missing {sorted(missing)[:5]}, unexpected "
                            f"{sorted(unexpected)[:5]}")
        main = not tdist.is_initialized() or tdist.get_rank() == 0
        for name, p in names.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if main:
                    p.data.copy_(f.get_tensor(name).to(p.dtype))
        for name, b in buffers.items():
            b.data.copy_(f.get_tensor(name).to(b.dtype))

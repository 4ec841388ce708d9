"""A Vision-MoE on DeepSpeed MoE: the MLP of every N-th ViT block replaced by `deepspeed.moe.layer.MoE` (V-MoE,
Riquelme et al. 2021; the m2mKD student).

`apply(vit, moe, ...)` swaps the MLPs of a timm VisionTransformer in place; `vit.build(spec)` calls it when the spec
carries a `moe` entry (`model.moe_every` > 0), so the target, its stages, the assembled model and the export are
V-MoEs wherever the dense ViT would be. Everything else is DeepSpeed's: top-k gating with capacity factor and token
dropping, random token selection, the load-balancing loss, expert parallelism over `ep_size` ranks (all-to-all), the
expert/data-parallel groups it creates in `deepspeed.initialize`, the expert parameter groups of the optimizer and
the per-expert checkpoint files.

Files always hold every expert under its global index (`...deepspeed_experts.<e>...`): a rank of an expert-parallel
engine holds experts [r * E/ep, (r + 1) * E/ep) of each layer as local 0..E/ep-1, so loading selects and renames
(`localize`) and saving gathers them over the expert-parallel group (`gather_experts`). Expert e is initialised from
the same random draws whatever ep_size is, so one seed gives one model at every expert-parallel layout.

    with moe.expert_parallel(2):          # the engine builder does this with model.moe_ep_size
        model = phase.build_model()       # each rank builds its E/2 local experts
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn

_EP_SIZE: ContextVar[int] = ContextVar("dsincubate_moe_ep_size", default=1)
_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


@contextmanager
def expert_parallel(ep_size: int):
    """Models built inside hold E/ep_size local experts per MoE layer (the rest live on the other ranks)."""
    token = _EP_SIZE.set(int(ep_size))
    try:
        yield
    finally:
        _EP_SIZE.reset(token)


def current_ep() -> int:
    """The expert-parallel size models are built for here (1 outside `expert_parallel`)."""
    return _EP_SIZE.get()


def ep_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group, as DeepSpeed lays the groups out (consecutive ranks form a
    group when there is no tensor or pipeline parallelism); checked against DeepSpeed's groups by `check_layout`."""
    import torch.distributed as tdist

    return (tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0) % ep_size


class MoEMlp(nn.Module):
    """A block's MLP as a DeepSpeed MoE layer; keeps the layer's load-balancing loss of the last forward."""

    def __init__(self, mlp: nn.Module, dim: int, cfg: dict, ep_size: int, block_index: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        experts, self.block_index = int(cfg["experts"]), block_index
        self.moe = MoE(hidden_size=dim, expert=copy.deepcopy(mlp), num_experts=experts, ep_size=ep_size,
                       k=int(cfg["top_k"]), capacity_factor=float(cfg["capacity_factor"]),
                       eval_capacity_factor=float(cfg["eval_capacity_factor"]),
                       min_capacity=int(cfg["min_capacity"]), drop_tokens=True, use_rts=True)
        self.l_aux: torch.Tensor | None = None
        _init_experts(self, mlp, experts, ep_size)

    def train(self, mode: bool = True):
        # DeepSpeed's random token selection (top-1) and sampled second expert (top-2) would also apply in
        # evaluation: on in training only, so evaluation routes deterministically (V-MoE's top-k)
        super().train(mode)
        gate = self.moe.deepspeed_moe.gate
        gate.use_rts = gate.top2_2nd_expert_sampling = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # FLOP counting on the meta device (accounting.count_flops): routing needs real values
            return self._compute_like(x)
        out, self.l_aux, _ = self.moe(x)
        return out

    def _compute_like(self, x: torch.Tensor) -> torch.Tensor:
        """The compute of a routed forward: the router, then top_k experts per token (what a token costs when no
        token is dropped; dispatch and combine, a few percent at these sizes, are left out)."""
        inner = self.moe.deepspeed_moe
        gate_logits = inner.gate.wg(x.float())
        experts = inner.experts.deepspeed_experts
        out = sum(experts[j % len(experts)](x) for j in range(inner.gate.k))
        self.l_aux = gate_logits.sum() * 0
        return out


def _init_experts(layer: MoEMlp, template: nn.Module, experts: int, ep_size: int) -> None:
    """timm's ViT init (trunc-normal 0.02 weights, zero biases) for the router and every global expert, drawn in
    expert order on every rank so that expert e has the same values at every ep_size; a rank keeps its own."""
    from timm.layers import trunc_normal_

    gate = layer.moe.deepspeed_moe.gate.wg
    trunc_normal_(gate.weight, std=.02)
    local = layer.moe.deepspeed_moe.experts.deepspeed_experts
    n_local, r = experts // ep_size, ep_rank(ep_size)
    for e in range(experts):
        draw = copy.deepcopy(template)
        for m in draw.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)
        if r * n_local <= e < (r + 1) * n_local:
            local[e - r * n_local].load_state_dict(draw.state_dict())


def apply(vit: nn.Module, cfg: dict) -> nn.Module:
    """Replace the MLP of blocks every-1, 2*every-1, ... (V-MoE's every other block for every=2) in place."""
    ep_size = _EP_SIZE.get()
    if int(cfg["experts"]) % ep_size:
        raise ValueError(f"{cfg['experts']} experts do not divide over expert-parallel size {ep_size}")
    dim = vit.embed_dim
    for b, block in enumerate(vit.blocks):
        if (b + 1) % int(cfg["every"]) == 0:
            block.mlp = MoEMlp(block.mlp, dim, cfg, ep_size, b)
    return vit


def layers(model: nn.Module) -> list[MoEMlp]:
    return [m for m in model.modules() if isinstance(m, MoEMlp)]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the load-balancing losses of the MoE layers that trained in the last forward (None without any)."""
    losses = [m.l_aux for m in layers(model)
              if m.l_aux is not None and any(p.requires_grad for p in m.parameters()) and m.training]
    for m in layers(model):
        m.l_aux = None  # a layer skipped in the next forward (imitation's tail) must not count twice
    return torch.stack([l.float() for l in losses]).sum() if losses else None


def is_expert_key(name: str) -> bool:
    return _EXPERT_KEY.match(name) is not None


def localize(tensors: dict[str, torch.Tensor], ep_size: int) -> dict[str, torch.Tensor]:
    """A file's global expert keys -> this rank's local ones (experts of other ranks dropped)."""
    if ep_size <= 1:
        return tensors
    out, r = {}, ep_rank(ep_size)
    for name, t in tensors.items():
        m = _EXPERT_KEY.match(name)
        if m is None:
            out[name] = t
            continue
        e = int(m.group(2))
        n_local = _experts_of(tensors, m.group(1)) // ep_size
        if r * n_local <= e < (r + 1) * n_local:
            out[f"{m.group(1)}{e - r * n_local}{m.group(3)}"] = t
    return out


def _experts_of(tensors: dict, prefix: str) -> int:
    return 1 + max(int(_EXPERT_KEY.match(n).group(2)) for n in tensors if n.startswith(prefix) and is_expert_key(n))


def gather_experts(tensors: dict[str, torch.Tensor], ep_size: int) -> dict[str, torch.Tensor]:
    """Local expert keys of every rank of the expert-parallel group -> global keys, every expert (a collective over
    that group; the other tensors are the same on every rank and kept as they are)."""
    if ep_size == 1:
        return tensors
    import torch.distributed as tdist
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    out = {}
    for name, t in tensors.items():
        m = _EXPERT_KEY.match(name)
        if m is None:
            out[name] = t
            continue
        n_local = _experts_of(tensors, m.group(1))
        parts = [torch.empty_like(t) for _ in range(ep_size)]
        tdist.all_gather(parts, t.contiguous(), group=group)
        for r, part in enumerate(parts):
            out[f"{m.group(1)}{r * n_local + int(m.group(2))}{m.group(3)}"] = part
    return out


def check_layout(ep_size: int) -> None:
    """After `deepspeed.initialize`: DeepSpeed's expert-parallel rank is the one the experts were built for."""
    if ep_size == 1:
        return
    from deepspeed.utils import groups

    theirs = groups._get_expert_parallel_rank(f"ep_size_{ep_size}")
    if theirs != ep_rank(ep_size):
        raise RuntimeError(f"DeepSpeed put this rank at expert-parallel rank {theirs}, the model was built for "
                           f"{ep_rank(ep_size)}")

"""Typed run configuration: model, data, per-phase training recipe, engine. Importing it pulls in no torch.

A run is described by one `RunConfig`. Recipes (`dsincubate.recipes`) build it; the command line overrides single
fields with `--set section.field=value`; the resolved config is saved next to every phase's output as `config.json`,
and `RunConfig.from_dict` reads it back (so `--config out/config.json` repeats a run exactly).

Every field has a docstring (`dsincubate config --fields` prints them) and its domain in the same line (`setting(
default, lo=..., hi=..., choices=...)`). `RunConfig.validate()` checks every domain and the relations between fields
(min_lr <= lr, warmup shorter than the phase, ...) whenever a config is built, so bad settings stop before any engine
starts. `None` means "not set". Engine concerns (ZeRO stage, precision, offload) live in `ds_configs/*.json`
(`dsincubate.dsconfig` merges the two).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from dsincubate import registry
from dsincubate.errors import UserError
from dsincubate.settings import _Checked, _check_domains, _from_dict, config_lines, setting  # noqa: F401 (API)


@dataclass
class ModelConfig(_Checked):
    """The target model and how it is divided."""

    preset: str = "tiny"
    """The model family and its size: a ViT preset (`dsincubate.models.vit.PRESETS`), deit_t_<depth>, any timm
    VisionTransformer name, or a CIFAR ResNet (resnet20/32/56/110_cifar, `dsincubate.models.resnet_cifar`; it refuses
    the ViT-only fields embed_dim, num_heads, patch_size, meta_embed_dim, meta_num_heads, moe_every,
    layer_scale_init)."""
    depth: Optional[int] = setting(None, lo=1)
    """Override the number of blocks (None keeps the preset's)."""
    embed_dim: Optional[int] = setting(None, lo=1)
    """Override the width (None keeps the preset's); must be divisible by num_heads."""
    num_heads: Optional[int] = setting(None, lo=1)
    """Override the number of attention heads (None keeps the preset's)."""
    img_size: Optional[int] = setting(None, lo=1)
    """Override the input resolution (None keeps the preset's); a multiple of patch_size."""
    patch_size: Optional[int] = setting(None, lo=1)
    """Override the patch size (None keeps the preset's)."""
    num_classes: Optional[int] = setting(None, lo=1)
    """Number of classes (None = taken from the dataset)."""
    num_stages: int = setting(4, lo=1)
    """K, the number of modules the target is divided into (paper default 4); at most the depth."""
    stage_depths: list[int] = setting(factory=list, lo=1)
    """Explicit blocks per stage, summing to the depth; empty = even split."""
    meta_depth_per_stage: int = setting(1, lo=1)
    """Blocks per stage of the meta model (paper: 1, the shallowest possible)."""
    meta_embed_dim: Optional[int] = setting(None, lo=1)
    """Width of the meta model (None = the target's). Another width than the target's incubates each module through
    stitch layers (LayerNorm + Linear) at its input and output, trained with it and dropped at assembly: one meta
    model serves targets of several widths (supplementary Sec. 3). Divisible by meta_num_heads."""
    meta_num_heads: Optional[int] = setting(None, lo=1)
    """Attention heads of the meta model (None = the target's)."""
    meta_init: str = ""
    """A trained model of the target's width to build the meta model from instead of a random init (supplementary
    Sec. 3): a run directory (its fine-tuned, else E2E model), a dsincubate model file or a timm checkpoint
    (.safetensors/.pth). Meta stage i takes the last `meta_depth_per_stage` blocks of target stage i (the blocks
    whose output the next stage was trained on), the embedding and the head; meta pre-training then starts from it
    (a few `meta.epochs` adapt it). Empty = random init, the paper's method."""
    kernel_backend: str = setting("torch", choices=("torch", "cuda", "auto", "autotune"))
    """'torch' (PyTorch's LayerNorm and SDPA, the default); opt-in fused csrc kernels: 'cuda' (each shape
    self-checked), 'auto' (LayerNorm only: one self-checked choice per op, device, dtype and head dim, the same on
    every rank; attention stays on SDPA, the attention kernel has no tensor cores) or 'autotune'
    (per shape the faster of kernel and torch, timed). `dsincubate ops` shows where each kernel was verified."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward (needed for ViT-H at useful batch sizes)."""
    layer_scale_init: float = setting(0.0, lo=0.0)
    """LayerScale (CaiT, Touvron et al. 2021; DeiT-III): each block's attention and MLP branch scaled per channel
    by a learned vector starting at this value (timm's `init_values`; CaiT: 0.1 up to depth 18, 1e-5 at 24, 1e-6
    deeper; DeiT-III: 1e-4). 0 = off, the plain ViT. The meta model gets it too. ViT only."""
    moe_every: int = setting(0, lo=0)
    """Vision-MoE (V-MoE): 0 = a dense ViT; N >= 1 = the MLP of every N-th block (blocks N-1, 2N-1, ...; V-MoE's
    every other block is 2) is a DeepSpeed MoE layer (`deepspeed.moe.layer.MoE`). The meta model stays dense.
    Needs ZeRO stage 0-2 (DeepSpeed's MoE layers do not support ZeRO-3)."""
    moe_experts: int = setting(8, lo=1)
    """Experts per MoE layer; divisible by moe_ep_size."""
    moe_top_k: int = setting(2, lo=1)
    """Experts each token is routed to (V-MoE: 2); at most moe_experts."""
    moe_capacity_factor: float = setting(1.25, lo=0.0, lo_open=True)
    """Training capacity per expert, as a multiple of tokens x top_k / experts (tokens over it are dropped and pass
    through the residual only)."""
    moe_eval_capacity_factor: float = setting(2.0, lo=0.0, lo_open=True)
    """Capacity factor in evaluation."""
    moe_min_capacity: int = setting(4, lo=0)
    """Least capacity per expert, whatever the factor gives."""
    moe_aux_weight: float = setting(0.01, lo=0.0)
    """Weight of the MoE layers' load-balancing loss added to every phase's objective (V-MoE: 0.01)."""
    moe_ep_size: int = setting(1, lo=1)
    """Expert parallelism: each MoE layer's experts are spread over groups of this many ranks (all-to-all routing,
    DeepSpeed's expert-parallel groups); the world size must be a multiple. Files always hold every expert."""


AUG_RECIPES = ("deit", "3aug", "none")
DEIT_T_PREFIX = "deit_t_"  # deit_t_<N>: DeiT-Tiny of depth N on 32x32 images (CIFAR-100), a preset and a recipe


def parse_deit_t(name: str) -> int | None:
    """N for a name deit_t_<N> (N >= 1), else None: the one parser of that name."""
    if name.startswith(DEIT_T_PREFIX) and name[len(DEIT_T_PREFIX):].isdigit() and int(name[len(DEIT_T_PREFIX):]) > 0:
        return int(name[len(DEIT_T_PREFIX):])
    return None


@dataclass
class DataConfig(_Checked):
    """Data options. Defaults suit the built-in demo; the DeiT values are the paper's ImageNet recipe."""

    train: str = ""
    """Training source: shard dir with manifest, manifest .json, shard paths/brace pattern, pipe: command, ImageFolder
    tree or `path label` list; "" = the built-in demo."""
    val: str = ""
    """Validation source, same forms; "" = the built-in demo."""
    train_manifest: str = ""
    """Manifest for the training shards when it is not next to them (pipe:/remote sources)."""
    val_manifest: str = ""
    """Manifest for the validation shards when it is not next to them."""
    demo_root: str = "demo_data"
    """Where the demo shards are generated (once; safe with concurrent ranks)."""
    num_workers: Optional[int] = setting(None, lo=0)
    """DataLoader worker processes per rank (0 = read in the training process); None = derived from the cores this
    rank has (CPU affinity / ranks on the node, less one for the rank's own thread; dsincubate.data.loader
    .default_workers). The sample order is reproducible for a given (seed, epoch, rank, num_workers): set it to
    resume bit-identically on a machine with another core count. With backend=dali it is DALI's thread count."""
    backend: str = setting("torch", choices=("torch", "dali"))
    """Decode + augmentation engine: "torch" (DataLoader workers, PIL + timm) or "dali" (NVIDIA DALI: GPU decode and
    augmentation when CUDA is present, CPU otherwise; needs `pip install .[dali]`; dsincubate/data/dali.py)."""
    shuffle_buffer: int = setting(1000, lo=0)
    """Samples held per worker for shuffling across shard boundaries."""
    resampled: bool = True
    """Draw shards with replacement, a fixed number of samples per epoch (multi-node safe); False = one exact pass
    over the (selected) data per epoch."""
    samples_per_epoch: Optional[int] = setting(None, lo=1)
    """Samples per epoch; None = the size of the whole training set, also when train_fraction or dmt_splits select
    a subset, so a subset trains for the full set's iterations (paper Tab. 5, supplementary §2)."""
    repeated_aug: int = setting(1, lo=1)
    """Repeated augmentation (DeiT's RASampler, on by default in DeiT and the official code with 3): each drawn sample
    is used this many times per epoch, each copy augmented on its own, the copies dealt round-robin over the ranks;
    the epoch length stays the same (1 = off). Needs resampled shards; every rank then reads the same shards."""
    recipe: str = setting("deit", choices=AUG_RECIPES)
    """Augmentation: "deit" (RandAugment, random erasing), "3aug" (DeiT-III 3-Augment) or "none" (resize + crop)."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec (deit recipe)."""
    color_jitter: float = setting(0.4, lo=0.0)
    """Colour jitter (deit recipe; timm disables it under RandAugment as DeiT does; 3aug uses 0.3)."""
    reprob: float = setting(0.25, lo=0.0, hi=1.0)
    """Random erasing probability (DeiT-III's 3aug used 0.0: set it so)."""
    mixup: float = setting(0.8, lo=0.0)
    """Mixup alpha (0 with cutmix 0 disables mixing)."""
    cutmix: float = setting(1.0, lo=0.0)
    """CutMix alpha."""
    smoothing: float = setting(0.1, lo=0.0, hi=1.0, hi_open=True)
    """Label smoothing (inside Mixup when it is on)."""
    train_fraction: float = setting(1.0, lo=0.0, hi=1.0, lo_open=True)
    """Class-balanced subset of the training set (paper Tab. 5: 0.25, 0.5), at the full set's iterations."""
    dmt_splits: int = setting(0, lo=0)
    """Decentralized modular training: incubation job I reads subset I of N disjoint class-balanced subsets
    (0 = off); meta pre-training and fine-tuning read the full set."""
    max_bad_fraction: float = setting(0.01, lo=0.0, hi=1.0)
    """Bad samples above this fraction of an epoch's samples stop the run."""


@dataclass
class TrainConfig(_Checked):
    """The recipe of one training phase (DeiT defaults, paper Sec. 4)."""

    epochs: int = setting(10, lo=1)
    """Epochs of this phase (an epoch is the data config's samples per epoch)."""
    micro_batch: int = setting(64, lo=1)
    """Micro-batch per rank; the global batch is micro_batch x grad_accum x world size."""
    grad_accum: Optional[int] = setting(None, lo=1)
    """Gradient accumulation steps; None = take it from the ds_config (or 1). Setting it in both is an error."""
    clip_grad: Optional[float] = setting(None, lo=0.0, lo_open=True)
    """Gradient clipping max norm, filled into DeepSpeed's `gradient_clipping` (None = off; the official code's
    fine-tuning uses 1.0). Setting it here and in the ds_config is an error."""
    optimizer: str = setting("adamw", choices=("adamw", "lamb", "sgd"))
    """'adamw', 'lamb' (the paper's large-model E2E baselines) or 'sgd' (InfoPro's and DGL's CIFAR ResNet recipe)."""
    momentum: float = setting(0.9, lo=0.0, hi=1.0, hi_open=True)
    """SGD only: its momentum, Nesterov where above 0 (InfoPro's and DGL's 0.9)."""
    lr: float = setting(5e-4, lo=0.0, lo_open=True)
    """Peak learning rate for a global batch of 512; scaled linearly by global batch / 512 (DeiT)."""
    min_lr: float = setting(1e-5, lo=0.0)
    """Floor of the cosine schedule (scaled like lr); at most lr."""
    warmup_epochs: float = setting(5.0, lo=0.0)
    """Linear warmup length in epochs (0 for fine-tuning, as in the paper); shorter than the phase."""
    warmup_lr: float = setting(1e-6, lo=0.0)
    """Learning rate at the start of warmup (scaled like lr); at most lr."""
    weight_decay: float = setting(0.05, lo=0.0)
    """Weight decay (decoupled for AdamW/LAMB, L2 for SGD); biases, norms, class token, position embedding get none."""
    betas: tuple[float, float] = setting((0.9, 0.999), lo=0.0, hi=1.0, hi_open=True)
    """Adam betas."""
    drop_path: float = setting(0.1, lo=0.0, hi=1.0, hi_open=True)
    """Stochastic depth rate of the trained model (target: 0.1 ViT-B, 0.5 ViT-L, 0.6 ViT-H in the paper)."""
    drop_path_mode: str = setting("linear", choices=("linear", "uniform"))
    """'linear' (timm/DeiT: 0 at the first block rising to drop_path at the last) or 'uniform' (CaiT: drop_path in
    every block; the paper's ViT-L/H E2E baselines)."""
    imitation: bool = False
    """Incubation only: train by Module Imitation (L1 to the meta stage's output) instead of Module Incubation."""
    kd_alpha: float = setting(0.5, lo=0.0, hi=1.0)
    """m2mKD only: weight of distillation, loss = (1 - kd_alpha) CE(s, y) + kd_alpha tau^2 KL(softmax(t/tau) ||
    softmax(s/tau)) with t, s the teacher's and the student's module I through the frozen meta tail."""
    kd_tau: float = setting(1.0, lo=0.0, lo_open=True)
    """m2mKD only: the distillation temperature tau."""
    teacher: str = "e2e"
    """m2mKD only: the trained monolithic model whose module I is distilled: 'e2e' or 'finetune' (this run's), or a
    dsincubate model file of the target's architecture (another run's, or an imported one)."""
    img_size: Optional[int] = setting(None, lo=1)
    """Fine-tune and e2e_tune only: the input resolution of this phase (None = the model's). Larger than the
    model's fine-tunes at high resolution (paper Tab. 1, the 384px rows): the position embedding is resampled
    (timm's bicubic resampling) when the earlier model is loaded; export records the new size. A multiple of the
    patch size."""
    meta_model: str = setting("fixed", choices=("fixed", "tunable", "random"))
    """Incubation only, the paper's meta ablation: 'fixed' (pre-trained, frozen; the method), 'tunable'
    (pre-trained, trained together with the module) or 'random' (randomly initialised, trained with the module)."""
    eval_every: int = setting(1, lo=1)
    """Evaluate every N epochs (and always after the last)."""
    ckpt_every: int = setting(1, lo=1)
    """Save a resumable checkpoint every N epochs (and always after the last)."""
    keep_checkpoints: int = setting(2, lo=1)
    """Resumable checkpoints to keep per phase."""

    def validate(self, where: str) -> None:
        _check_domains(self, where)
        if self.min_lr > self.lr:
            raise UserError(f"{where}.min_lr={self.min_lr} is above {where}.lr={self.lr}")
        if self.warmup_lr > self.lr:
            raise UserError(f"{where}.warmup_lr={self.warmup_lr} is above {where}.lr={self.lr}")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise UserError(f"{where}.warmup_epochs={self.warmup_epochs} is not shorter than the phase "
                            f"({where}.epochs={self.epochs})")


@dataclass
class InfoProLoss(_Checked):
    """InfoPro's local loss (Wang et al., ICLR 2021; `dsincubate.decoupled`): auxiliary module k < K-1 minimises
    lambda_1 x reconstruction + lambda_2 x class term, each lambda linear in k from `_first` (module 0) to `_last`
    (module K-2), as its code (ixx_1/2, ixy_1/2). Defaults: its ResNet-110 K = 4 command on CIFAR-10 (1, 0 -> 0, 1);
    its only K = 3 setting is InfoPro*'s (5, 0 -> 5, 0.1). The last module trains on the model's own head (CE)."""

    recon_first: float = setting(1.0, lo=0.0)
    """lambda_1 (reconstruction weight) of module 0 (InfoPro: ixx_1)."""
    recon_last: float = setting(0.0, lo=0.0)
    """lambda_1 of module K-2 (InfoPro: ixx_2)."""
    ce_first: float = setting(0.0, lo=0.0)
    """lambda_2 (class-term weight) of module 0 (InfoPro: ixy_1)."""
    ce_last: float = setting(1.0, lo=0.0)
    """lambda_2 of module K-2 (InfoPro: ixy_2)."""
    info_y: str = setting("cross_entropy", choices=("cross_entropy", "contrast"))
    """The lambda_2 term (I(h, y)): the auxiliary classifier's 'cross_entropy', or 'contrast' (its CIFAR commands):
    supervised contrastive loss on `feature_dim` L2-normalised features, over each rank's micro-batch."""
    info_x: str = setting("mse", choices=("mse", "bce"))
    """The lambda_1 term (I(h, x)): 'mse' to the normalised image, or 'bce' (its code): sigmoid output, binary
    cross-entropy to the image in [0, 1]."""
    temperature: float = setting(0.07, lo=0.0, lo_open=True)
    """info_y=contrast only: the contrastive temperature (InfoPro: 0.07, also its base temperature)."""
    feature_dim: int = setting(128, lo=1)
    """info_y=contrast only: the auxiliary net's output features (InfoPro's `--aux_net_feature_dim` 128)."""


def __getattr__(name: str):
    if name == "TRAIN_SECTIONS":  # the sections the registered phases read (dsincubate.registry), read when asked
        return registry.train_sections()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RunConfig(_Checked):
    """Everything a pipeline run needs; one per output directory."""

    name: str = "demo"
    """Recipe name, for the record."""
    seed: int = setting(0, lo=0)
    """Seed for initialisation, data order and augmentation."""
    ds_config: str = "auto"
    """A file in ds_configs/ (name or path); 'auto' = per phase: cpu without CUDA; with CUDA zero0_autocast_bf16 for
    LAMB phases (LAMB needs ZeRO-0), else the lowest ZeRO stage whose model states fit in half a device (zero2_bf16,
    zero3_bf16, zero3_offload; the rule: `dsincubate.dsconfig`). A name given here always wins."""
    grad_reduce_dtype: str = setting("auto", choices=("auto", "fp32", "bf16"))
    """Data type gradients are reduced in across ranks: 'auto' = the ds_config's (its communication_data_type, else
    the training precision, bf16 in the bf16 configs); 'fp32' reduces bf16 gradients in fp32 (twice the bytes on the
    wire, no bf16 rounding of the sum). Filled into DeepSpeed's communication_data_type; setting it here and in the
    ds_config is an error."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The target model and its division."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data, augmentation."""
    meta: TrainConfig = field(default_factory=TrainConfig)
    """Pre-training of the meta model."""
    incubate: TrainConfig = field(default_factory=TrainConfig)
    """Training of each target module inside the frozen meta model."""
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(warmup_epochs=0.0))
    """Fine-tuning of the assembled model (no warmup)."""
    e2e: TrainConfig = field(default_factory=TrainConfig)
    """The end-to-end baseline."""
    e2e_tune: TrainConfig = field(default_factory=lambda: TrainConfig(warmup_epochs=0.0))
    """The paper's "E2E + tuning" control: the E2E model trained further with fine-tune's recipe (method e2e_tune)."""
    m2mkd: TrainConfig = field(default_factory=TrainConfig)
    """m2mKD: distilling module I of a trained teacher into student module I through the frozen meta model
    (`dsincubate m2mkd --module I`); the recipes copy incubation's settings."""
    m2mkd_finetune: TrainConfig = field(default_factory=lambda: TrainConfig(warmup_epochs=0.0, clip_grad=1.0))
    """Training the assembled m2mKD students end to end (`dsincubate m2mkd_finetune`; the m2mKD recipe: no warmup,
    gradient clipping 1.0)."""
    # ---- the decoupled baselines (dsincubate.decoupled; issue 24): recipes.get gives them e2e's settings
    dgl: TrainConfig = field(default_factory=TrainConfig)
    """DGL (decoupled greedy learning): the K modules trained at once, each on its auxiliary classifier's loss."""
    infopro: TrainConfig = field(default_factory=TrainConfig)
    """InfoPro: DGL's modules, each local loss with a reconstruction term (weights: infopro_loss)."""
    infopro_loss: InfoProLoss = field(default_factory=InfoProLoss)
    """InfoPro's per-module weights of reconstruction and cross-entropy."""
    # ---- end of the decoupled baselines
    stop_after_epochs: Optional[int] = setting(None, lo=1)
    """Stop each phase after this many epochs in one invocation (None = run to the end); the next invocation
    resumes. For time-limited or preemptible jobs."""
    collective_timeout_s: float = setting(600.0, lo=1.0)
    """Seconds a collective (all-reduce, barrier, ...) waits for the other ranks before this rank fails: bounds how
    long a job hangs when a host dies or its link is cut (a killed process is noticed at once). Not part of any
    output's identity."""
    log_every: int = setting(50, lo=1)
    """Training steps between the one-line progress reports rank 0 prints when its output is not a terminal
    (SLURM, pdsh, redirected logs); on a terminal a progress bar is drawn instead."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        cfg = _from_dict(cls, d, "")
        cfg.validate()
        return cfg

    def validate(self) -> "RunConfig":
        """Every field's domain and the relations between fields; raises UserError naming the field."""
        for sub, where in ((self, "config"), (self.model, "model"), (self.data, "data"),
                           (self.infopro_loss, "infopro_loss")):
            _check_domains(sub, where)
        for name in registry.train_sections():
            self.train_config(name).validate(name)
            if self.train_config(name).img_size and name not in registry.resizing_sections():
                raise UserError(f"{name}.img_size: only fine-tuning ({', '.join(registry.resizing_sections())}) "
                                "changes the resolution; set model.img_size for the whole run")
        m = self.model
        if m.embed_dim and m.num_heads and m.embed_dim % m.num_heads:
            raise UserError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
        if m.meta_embed_dim and m.meta_num_heads and m.meta_embed_dim % m.meta_num_heads:
            raise UserError(f"model.meta_embed_dim={m.meta_embed_dim} is not divisible by "
                            f"model.meta_num_heads={m.meta_num_heads}")
        if m.moe_every and m.moe_experts % m.moe_ep_size:
            raise UserError(f"model.moe_experts={m.moe_experts} is not divisible by model.moe_ep_size={m.moe_ep_size}")
        if m.moe_every and m.moe_top_k > m.moe_experts:
            raise UserError(f"model.moe_top_k={m.moe_top_k} is above model.moe_experts={m.moe_experts}")
        if m.img_size and m.patch_size and m.img_size % m.patch_size:
            raise UserError(f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}")
        if m.stage_depths and len(m.stage_depths) != m.num_stages:
            raise UserError(f"model.stage_depths has {len(m.stage_depths)} entries but model.num_stages={m.num_stages}")
        if self.data.repeated_aug > 1 and not self.data.resampled:
            raise UserError(f"data.repeated_aug={self.data.repeated_aug} needs data.resampled=true (a one-pass epoch "
                            "uses every sample once)")
        if self.data.dmt_splits and self.data.dmt_splits != m.num_stages:
            raise UserError(f"data.dmt_splits={self.data.dmt_splits}: decentralized training gives each of the "
                            f"K={m.num_stages} modules its own subset; use dmt_splits={m.num_stages} or 0")
        return self

    def save(self, path) -> None:
        from dsincubate.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    def train_config(self, phase: str) -> TrainConfig:
        """The recipe of a phase (its registry entry's config section) or of a section named directly."""
        section = registry.phase(phase).config_section if phase in registry.list_phases() else phase
        tc = getattr(self, section, None)
        if not isinstance(tc, TrainConfig):
            raise UserError(f"phase {phase}: the config has no training section {section!r} (a TrainConfig field "
                            "of RunConfig)")
        return tc


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.field=value` overrides (e.g. `incubate.epochs=3`, `model.stage_depths=2,4,4,2`); validates."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = d
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--set {key}: no such section {part!r}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise UserError(f"--set {key}: no such field {parts[-1]!r}")
        node[parts[-1]] = value
    return RunConfig.from_dict(d)


ALL_SECTIONS = (RunConfig, ModelConfig, DataConfig, TrainConfig, InfoProLoss)

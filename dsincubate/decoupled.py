"""The paper's decoupled-training baselines (Tab. 2) as phases: DGL and InfoPro, methods `dgl` and `infopro`.

Both divide the target into the K modules Deep Incubation uses (`model.num_stages`, `model.stage_depths`) and train
them at once in one job, each on a local loss only: module k's input is module k-1's output *detached*, so no
gradient crosses a module boundary; modules 0..K-2 each feed an auxiliary network, the last module's is the model's
own head. What they export is the target alone (the auxiliary networks are dropped), read by eval and export like
e2e's model.

    dgl      DGL, Belilovsky, Eickenberg & Oyallon, "Decoupled Greedy Learning of CNNs", ICML 2020
             (github.com/eugenium/DGL): module k minimises the cross-entropy of its auxiliary classifier. This is
             the synchronous variant (all modules step together on the same batch); the paper's asynchronous,
             replay-buffered variant is not implemented.                        -> dgl/model.safetensors
    infopro  InfoPro, Wang, Ni, Song, Yang & Huang, "Revisiting Locally Supervised Learning: an Alternative to
             End-to-end Training", ICLR 2021 (github.com/blackfeather-wang/InfoPro-Pytorch): module k < K-1
             minimises lambda_1(k) * reconstruction + lambda_2(k) * cross-entropy, lambda interpolated linearly
             from the first to the last auxiliary module as in its code (`infopro_loss`). -> infopro/model.safetensors

    dsincubate pipeline --recipe debug --methods dgl,infopro --output runs/decoupled --set dgl.epochs=2

Auxiliary networks, per the family's boundary (`family.Boundary`, from the model-family seam):
- tokens (a ViT): mean over the tokens -> LayerNorm -> Linear (a DeiT head on pooled tokens); InfoPro's decoder is
  a per-patch-token Linear back to that patch's pixels (MAE's decoder head without its transformer), because the
  patch tokens are the spatial map a ViT has: it plays the role of InfoPro's conv decoder on a CNN's feature map.
- a feature map (a CIFAR ResNet): InfoPro's "1c2f" classifier (3x3 conv, stride 2 and twice the channels below 64,
  BN, ReLU, global pool, Linear 128, ReLU, Linear) for both methods (the DGL code's CIFAR nets use their own
  pooled MLPs; the Deep Incubation paper ran both baselines in its own code, so one classifier keeps the comparison
  about the loss) and InfoPro's decoder (bilinear upsampling to the image, 3x3 conv to 12 channels, BN, ReLU, 3x3
  conv to 3).
Loss forms (`infopro_loss.info_x`, `info_y`): by default the reconstruction is the mean squared error to the model's
input (the normalised image) and the class term the auxiliary classifier's cross-entropy (a form InfoPro's code also
offers). InfoPro's CIFAR commands use `info_x=bce` (sigmoid output, binary cross-entropy to the un-normalised image
in [0, 1]) and `info_y=contrast` (the supervised contrastive loss of Khosla et al., NeurIPS 2020, on L2-normalised
features of the auxiliary net, temperature 0.07: `supcon_loss`); both measure how much of x, and of y, the features
keep (its I(h, x) and I(h, y) terms).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsincubate.data import DataInfo
from dsincubate.errors import UserError
from dsincubate.models import family, staged
from dsincubate.phase_base import Phase, persistent_buffers


class TokenClassifier(nn.Module):
    """Auxiliary classifier on tokens: mean over the tokens -> LayerNorm -> Linear."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        # PyTorch's default init (as both papers' auxiliary nets), set inside each layer's constructor: the same
        # values when built inside deepspeed.zero.Init, where a re-init after construction would write into shards
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=1)))


class ConvClassifier(nn.Module):
    """InfoPro's "1c2f" auxiliary classifier on a feature map (its auxiliary_nets.py, by rule instead of a table)."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 128):
        super().__init__()
        out, stride = (2 * channels, 2) if channels < 64 else (channels, 1)
        self.net = nn.Sequential(nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(out, hidden),
                                 nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ReconLoss(nn.Module):
    """A decoder's loss: 'mse' to the normalised image, or 'bce' (InfoPro's): sigmoid of the decoder's output against
    the image un-normalised to [0, 1] (the data's mean and std: `DataInfo`'s, which every loader normalises with)."""

    def __init__(self, form: str = "mse"):
        super().__init__()
        self.form = form
        self.register_buffer("mean", torch.tensor(DataInfo.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(DataInfo.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        recon, image = recon.float(), image.float()
        if self.form == "mse":
            return F.mse_loss(recon, image)
        # clamped: random erasing writes N(0, 1) noise in normalised units, which may leave [0, 1]
        target = (image * self.std + self.mean).clamp(0.0, 1.0)
        return F.binary_cross_entropy_with_logits(recon, target)  # = BCE(sigmoid(recon)), numerically safer


class TokenDecoder(nn.Module):
    """Reconstructs the image from the patch tokens: each token -> Linear -> its patch's pixels; returns the
    reconstruction loss (`ReconLoss`)."""

    def __init__(self, width: int, grid: tuple[int, int], img_size: int, channels: int = 3, form: str = "mse"):
        super().__init__()
        self.grid, self.patch, self.channels = grid, img_size // grid[0], channels
        self.proj = nn.Linear(width, self.patch * self.patch * channels)
        self.loss = ReconLoss(form)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        (gh, gw), p, c = self.grid, self.patch, self.channels
        patches = self.proj(x[:, x.shape[1] - gh * gw:])  # the patch tokens are the last gh x gw
        recon = patches.reshape(-1, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, gh * p, gw * p)
        return self.loss(recon, image)


class ConvDecoder(nn.Module):
    """InfoPro's decoder: upsample to the image size, 3x3 conv (12 channels), BN, ReLU, 3x3 conv to the image;
    returns the reconstruction loss (`ReconLoss`; InfoPro's sigmoid is the 'bce' form's)."""

    def __init__(self, channels: int, img_size: int, hidden: int = 12, form: str = "mse"):
        super().__init__()
        self.img_size = img_size
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                 nn.Conv2d(hidden, 3, 3, padding=1))
        self.loss = ReconLoss(form)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=True)
        return self.loss(self.net(x), image)


def aux_classifier(boundary: family.Boundary, out_dim: int) -> nn.Module:
    """The auxiliary net at `boundary`; `out_dim` outputs: the classes, or the contrastive features."""
    return TokenClassifier(boundary.shape[-1], out_dim) if boundary.grid else ConvClassifier(boundary.shape[0], out_dim)


def decoder(boundary: family.Boundary, img_size: int, form: str = "mse") -> nn.Module:
    return TokenDecoder(boundary.shape[-1], boundary.grid, img_size, form=form) if boundary.grid else \
        ConvDecoder(boundary.shape[0], img_size, form=form)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                base_temperature: float = 0.07) -> torch.Tensor:
    """The supervised contrastive loss (Khosla et al., NeurIPS 2020) with one view per image, as InfoPro's
    `SupConLoss` computes it: each image an anchor, the other images of its class its positives, every other image
    in the batch its contrast set; -(T / T_base) x the mean log-probability of the positives, averaged over all
    anchors (an anchor without a positive adds 0). `features` [B, D] are L2-normalised here."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # for numerical stability, as there
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    mean_pos = (log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_pos.mean()


class Decoupled(staged.StagedModel):
    """The target's K stages with an auxiliary classifier after each of stages 0..K-2 (`aux.k`) and, for InfoPro, a
    decoder there too (`decoders.k`). Training forward: `staged.PerModule(logits of aux 0..K-2 and the model's, the
    decoders' reconstruction losses)`, each stage run on its predecessor's output detached. Evaluation: the target's
    logits. Its `stages.*` keys are the target's, so the target's state dict is its own without `aux.*` /
    `decoders.*`."""

    def __init__(self, stages: list[staged.Stage], heads: list[nn.Module], decoders: list[nn.Module] | None = None):
        super().__init__(stages)
        if len(heads) != len(stages) - 1 or (decoders is not None and len(decoders) != len(heads)):
            raise ValueError(f"{len(stages)} stages need {len(stages) - 1} auxiliary heads (and decoders)")
        self.aux = nn.ModuleList(heads)
        self.decoders = nn.ModuleList(decoders) if decoders is not None else None

    def forward(self, x: torch.Tensor):
        if not self.training:
            return super().forward(x)
        image, logits, recon = x, [], []
        for k, stage in enumerate(self.stages):
            x = stage(x.detach() if k else x)  # the gradient isolation: nothing flows back into module k-1
            if k < len(self.aux):
                logits.append(self.aux[k](x))
                if self.decoders is not None:
                    recon.append(self.decoders[k](x, image))
        return staged.PerModule(tuple(logits + [x]), tuple(recon))

    def target_names(self) -> list[str]:
        """The target's parameters and persistent buffers (what the phase saves)."""
        return [n for n, _ in self.named_parameters() if n.startswith("stages.")] + \
            persistent_buffers(self, "stages.")


def infopro_weights(k: int, num_stages: int, lam) -> tuple[float, float]:
    """(lambda_1, lambda_2) of auxiliary module k < K-1: InfoPro's code interpolates linearly from the first
    module's (`*_first`) to the last auxiliary module's (`*_last`), ratio k / (K-2) (0 when K = 2)."""
    r = k / (num_stages - 2) if num_stages > 2 else 0.0
    return (lam.recon_first * (1 - r) + lam.recon_last * r, lam.ce_first * (1 - r) + lam.ce_last * r)


class DGLPhase(Phase):
    """Decoupled Greedy Learning (Belilovsky et al., ICML 2020), synchronous: all K modules, each with its own
    auxiliary classifier, trained at once on their local cross-entropies."""

    name = "dgl"
    reconstruct = False

    def boundaries(self) -> list[family.Boundary]:
        """The features at the K-1 module boundaries, from the model-family seam (a family without
        `boundary_shape`: UserError)."""
        spec = self.target_spec()
        fam = family.family_of(spec)
        try:
            return [fam.boundary_shape(spec, k) for k in range(self.cfg.model.num_stages - 1)]
        except NotImplementedError:
            raise UserError(f"{self.name}: the {fam.name} model family does not give its boundary shapes "
                            "(Family.boundary_shape), which the auxiliary networks are built for") from None

    def resolve_inputs(self) -> None:
        super().resolve_inputs()
        self.boundaries()  # refused before anything is built

    def build_model(self, load: bool = True) -> nn.Module:
        target, bounds = self.target(), self.boundaries()
        heads = [aux_classifier(b, self.aux_outputs()) for b in bounds]
        decoders = [decoder(b, self.img_size, self.recon_form()) for b in bounds] if self.reconstruct else None
        return Decoupled(list(target.stages), heads, decoders)

    def aux_outputs(self) -> int:
        """The auxiliary nets' outputs: the classes (cross-entropy)."""
        return self.num_classes

    def recon_form(self) -> str:
        return "mse"

    def class_term(self, aux_out: torch.Tensor, targets: torch.Tensor, criterion) -> tuple[str, torch.Tensor]:
        """(name, value) of an auxiliary module's class term: DGL's is the auxiliary classifier's cross-entropy."""
        return "ce", criterion(aux_out.float(), targets)

    def local_weights(self, k: int) -> tuple[float, float]:
        """(reconstruction weight, class-term weight) of module k's local loss."""
        return 0.0, 1.0

    def loss(self, output, targets, criterion) -> dict[str, torch.Tensor]:
        """"loss": the sum of the K local losses (each reaches only its own module's and auxiliary net's
        parameters, so the sum trains every module on its own loss); per module k: local_k, its class term (ce_k,
        or supcon_k) and recon_k."""
        if not isinstance(output, staged.PerModule):
            return {"loss": criterion(output.float(), targets)}
        K = self.cfg.model.num_stages
        logits, recon = output.logits, output.recon
        total, terms = 0.0, {}
        for k in range(K):
            if k < K - 1:
                name, term = self.class_term(logits[k], targets, criterion)
                w_recon, w_y = self.local_weights(k)
                local = w_y * term + (w_recon * recon[k] if recon else 0.0)
                if recon:
                    terms[f"recon_{k}"] = recon[k].detach()
            else:  # the last module: the model's own head, plain cross-entropy (as in both papers' code)
                name, term = "ce", criterion(logits[k].float(), targets)
                local = term
            terms[f"{name}_{k}"], terms[f"local_{k}"] = term.detach(), local.detach()
            total = total + local
        return {"loss": total, **terms}

    def output_names(self, model: nn.Module) -> list[str]:
        return model.target_names()


class InfoProPhase(DGLPhase):
    """InfoPro (Wang et al., ICLR 2021): DGL's modules with a decoder each, local loss lambda_1 * reconstruction +
    lambda_2 * class term (the `infopro_loss` config section: weights and the two terms' forms)."""

    name = "infopro"
    reconstruct = True

    def config_key(self) -> dict:
        return dict(super().config_key(), infopro_loss=self.cfg.to_dict()["infopro_loss"])

    def resolve_inputs(self) -> None:
        super().resolve_inputs()
        d = self.cfg.data
        if self.cfg.infopro_loss.info_y == "contrast" and (d.mixup > 0 or d.cutmix > 0):
            # mixed images have soft labels, and a contrastive positive needs one class
            raise UserError(f"infopro_loss.info_y=contrast needs one label per image: set data.mixup=0 and "
                            f"data.cutmix=0 (got {d.mixup}, {d.cutmix})")

    def aux_outputs(self) -> int:
        lam = self.cfg.infopro_loss
        return lam.feature_dim if lam.info_y == "contrast" else self.num_classes

    def recon_form(self) -> str:
        return self.cfg.infopro_loss.info_x

    def class_term(self, aux_out: torch.Tensor, targets: torch.Tensor, criterion) -> tuple[str, torch.Tensor]:
        lam = self.cfg.infopro_loss
        if lam.info_y == "contrast":
            return "supcon", supcon_loss(aux_out, targets, lam.temperature)
        return super().class_term(aux_out, targets, criterion)

    def local_weights(self, k: int) -> tuple[float, float]:
        return infopro_weights(k, self.cfg.model.num_stages, self.cfg.infopro_loss)

"""Baseline CNN and D-SphereNet (docs/METHOD.md §2, Table 4) with the heads of §3.

Every model returns `(logits, cosines)`: the logits the head trains on, and the cosine
between the feature x (the FC layer's output, the classifier's input) and every class
weight W_j. The cosines are what robust geodesic inference (§4) uses.

Heads:
- "softmax":   plain linear classifier with bias (the baseline's).
- "wsoftmax":  W-Softmax, logits ||x|| g(W_j, x) (class weights normalized).
- "wm":        weight multiplier, logits |α| g(W_j, x), learnable α, loss + η|α| (eq. 6).
- "anneal":    sphere-normalized softmax g(W_j, x) annealed with W-Softmax (eq. 7-8);
               the returned logits are the W-Softmax ones (same argmax), the loss
               uses both (see objectives.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from training.layers import CORRS, SphereConv2d, SphereLinear

ARCHS = ("baseline", "dsphere")
HEADS = ("softmax", "wsoftmax", "wm", "anneal")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved in every checkpoint."""

    arch: str = "dsphere"
    corr: str = "cosine"
    head: str = "wm"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 2
    fc_dim: int = 256
    feature_relu: bool = True
    sigmoid_k: float = 0.3
    quadratic_a: float = 1.0
    wm_init: float = 10.0
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.corr not in CORRS:
            raise ValueError(f"unknown corr {self.corr!r}; expected one of {', '.join(CORRS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")

    @classmethod
    def for_input(cls, input_shape: tuple[int, int, int], **kw: Any) -> ModelConfig:
        """Table 4: MNIST-like (1x28x28) or CIFAR-10 (3x32x32) widths."""
        if input_shape[0] == 3:
            kw.setdefault("widths", (64, 128, 256))
            kw.setdefault("convs_per_stage", 3)
            kw.setdefault("fc_dim", 512)
        return cls(input_shape=tuple(input_shape), **kw)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)  # type: ignore[arg-type]


class Classifier(nn.Module):
    """The last layer: class weights W (K, d) and the head's logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head = cfg.head
        if cfg.head == "softmax":
            self.linear: nn.Module = nn.Linear(cfg.fc_dim, cfg.num_classes)
        else:
            self.linear = SphereLinear(cfg.fc_dim, cfg.num_classes, cfg.corr, cfg.sigmoid_k, cfg.quadratic_a)
        self.alpha = nn.Parameter(torch.tensor(float(cfg.wm_init))) if cfg.head == "wm" else None
        self.sphere_logits: Tensor | None = None  # g(W_j, x) of the last forward, for eq. 8

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w: Tensor = self.linear.weight  # type: ignore[assignment]  # (K, d)
        x_norm = torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + 1e-12)  # (N, 1)
        w_norm = torch.sqrt(w.pow(2).sum(dim=1) + 1e-12)  # (K,)
        cosines = (x @ w.t()) / (x_norm * w_norm)  # (N, K)
        if self.head == "softmax":
            return self.linear(x), cosines
        g = self.linear(x)  # (N, K) = g(W_j, x)
        if self.head == "wm":
            assert self.alpha is not None
            return self.alpha.abs() * g, cosines
        self.sphere_logits = g if self.head == "anneal" else None
        return x_norm * g, cosines


class ConvNet(nn.Module):
    """Table 4 trunk + FC feature layer + classifier; baseline or D-SphereNet."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        sphere = cfg.arch == "dsphere"
        layers: list[nn.Module] = []
        c_in, h, w = cfg.input_shape
        for width in cfg.widths:
            for _ in range(cfg.convs_per_stage):
                if sphere:
                    layers.append(SphereConv2d(c_in, width, 3, padding=1, corr=cfg.corr,
                                               sigmoid_k=cfg.sigmoid_k, quadratic_a=cfg.quadratic_a))
                else:
                    layers.append(nn.Conv2d(c_in, width, 3, padding=1))
                layers.append(nn.ReLU(inplace=True))
                c_in = width
            layers.append(nn.MaxPool2d(2, 2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        flat = c_in * h * w
        if sphere:
            self.fc: nn.Module = SphereLinear(flat, cfg.fc_dim, cfg.corr, cfg.sigmoid_k, cfg.quadratic_a)
        else:
            self.fc = nn.Linear(flat, cfg.fc_dim)
        self.classifier = Classifier(cfg)

    def feature(self, x: Tensor) -> Tensor:
        """The feature x of the paper: output of the FC layer, (N, fc_dim)."""
        z = self.fc(self.features(x).flatten(1))
        return torch.relu(z) if self.config.feature_relu else z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier(self.feature(x))


def build_model(cfg: ModelConfig) -> ConvNet:
    return ConvNet(cfg)


class LogitsOnly(nn.Module):
    """Adapter for tools that expect a plain logits model (attacks, ART), around a model
    returning (logits, cosines) or plain logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, tuple) else out

"""Does geodesic rejection earn its place? Three rejection scores on the same examples:

- the angle ratio θ / (θ*ⱼ + θσⱼ) of the predicted class: the service's rule, rejecting
  above ρ (calibrated on validation to the target clean false-reject rate);
- the maximum softmax probability (Hendrycks & Gimpel 2017, "A Baseline for Detecting
  Misclassified and Out-of-Distribution Examples"): reject below a threshold;
- the class-conditional Mahalanobis distance of the feature (Lee et al. 2018, "A Simple
  Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"):
  class means and one shared covariance fit on training features, score = the distance to
  the closest class mean, reject above a threshold.

Each score is reported as AUROC (clean test inputs vs the attacked inputs the attack
misclassified) and as the catch rate at a threshold set like ρ: on the validation split, to
the same clean false-reject rate. Each score is also attacked adaptively: the angle by the
attacks on the verdict, the other two by `ScoreAttack` (`detector_table`), so that their catch
rates are measurements and not upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from training.attacks import eval_mode, features, project
from training.evaluation.runner import AttackRunner, splits
from training.evaluation.schema import Detector, DetectorScore
from training.evaluation.scoring import Judged, judge, roc_auc
from training.evaluation.settings import settings
from training.models import ConvNet


def features_of(model: ConvNet, x: Tensor, batch_size: int = 500) -> np.ndarray:
    """The feature the last layer sees, (N, d) float64."""
    return features(model, x, batch_size).double().numpy()


@dataclass(frozen=True)
class Mahalanobis:
    """Class means μ_c (K, d) and the precision of the shared covariance (d, d)."""

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int) -> Mahalanobis:
        means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])
        centered = features - means[labels]
        cov = centered.T @ centered / len(features)
        return cls(means, np.linalg.pinv(cov, hermitian=True))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """min_c (f - μ_c)ᵀ Σ⁻¹ (f - μ_c) per row, (N, d) -> (N,)."""
        d = features[:, None, :] - self.means[None, :, :]  # (N, K, d)
        return np.einsum("nkd,de,nke->nk", d, self.precision, d).min(1)


@dataclass(frozen=True)
class Scores:
    """Rejection scores of a set of inputs, each oriented so that higher = more suspicious."""

    angle_ratio: np.ndarray
    neg_max_softmax: np.ndarray
    mahalanobis: np.ndarray | None

    @classmethod
    def of(cls, judged: Judged, mahalanobis: np.ndarray | None) -> Scores:
        return cls(judged.ratio, -judged.msp, mahalanobis)

    def named(self) -> dict[str, np.ndarray]:
        out = {"angle ratio (geodesic rule)": self.angle_ratio, "max softmax probability": self.neg_max_softmax}
        if self.mahalanobis is not None:
            out["Mahalanobis distance"] = self.mahalanobis
        return out


def detector(attack: str, clean: Scores, clean_judged: Judged, adv: Scores, adv_judged: Judged,
             validation: Scores, rho: float, false_reject: float) -> Detector | None:
    """The standard protocol: negatives are the clean inputs the model classifies CORRECTLY;
    positives are the attacked versions of those same inputs that the attack got
    misclassified. None when there is no positive (nothing to detect). Thresholds come from
    the validation split (rho for the angle ratio)."""
    m = min(clean_judged.n, adv_judged.n)
    right = clean_judged.correct[:m]
    fooled = right & ~adv_judged.correct[:m]
    if not fooled.any() or not right.any():
        return None
    rows = []
    for name, all_neg in clean.named().items():
        neg, pos = all_neg[:m][right], adv.named()[name][:m][fooled]
        threshold = rho if name.startswith("angle") else float(np.quantile(validation.named()[name], 1 - false_reject))
        rows.append(DetectorScore(score=name, auroc=roc_auc(neg, pos), threshold=threshold,
                                  validation_reject=float((validation.named()[name] > threshold).mean()),
                                  clean_reject=float((neg > threshold).mean()),
                                  adversarial_catch=float((pos > threshold).mean())))
    neg, pos = clean_judged.ratio[:m][right], adv_judged.ratio[:m][fooled]
    return Detector(attack=attack, n_clean=len(neg), n_adversarial=len(pos), auc=roc_auc(neg, pos),
                    clean_reject_at_rho=float((neg > rho).mean()), adversarial_catch_at_rho=float((pos > rho).mean()),
                    clean_reject_at_rho1=float((neg > 1).mean()), adversarial_catch_at_rho1=float((pos > 1).mean()),
                    scores=rows, protocol="correct clean vs fooled attacked")


def misclassification_detector(clean: Scores, clean_judged: Judged, validation: Scores, rho: float,
                               false_reject: float) -> Detector | None:
    """Not an attack detector: how well each score tells the clean inputs the model gets
    wrong (positives) from those it gets right (negatives). Reported apart, as its own row."""
    wrong = ~clean_judged.correct
    if not wrong.any() or wrong.all():
        return None
    rows = []
    for name, score in clean.named().items():
        threshold = rho if name.startswith("angle") else float(np.quantile(validation.named()[name], 1 - false_reject))
        neg, pos = score[~wrong], score[wrong]
        rows.append(DetectorScore(score=name, auroc=roc_auc(neg, pos), threshold=threshold,
                                  validation_reject=float((validation.named()[name] > threshold).mean()),
                                  clean_reject=float((neg > threshold).mean()),
                                  adversarial_catch=float((pos > threshold).mean())))
    neg, pos = clean_judged.ratio[~wrong], clean_judged.ratio[wrong]
    return Detector(attack="misclassification (clean)", n_clean=len(neg), n_adversarial=len(pos),
                    auc=roc_auc(neg, pos), clean_reject_at_rho=float((neg > rho).mean()),
                    adversarial_catch_at_rho=float((pos > rho).mean()), clean_reject_at_rho1=float((neg > 1).mean()),
                    adversarial_catch_at_rho1=float((pos > 1).mean()), scores=rows,
                    protocol="clean right vs clean wrong")


@dataclass(frozen=True)
class ScoreAttack:
    """An adaptive attack on a rejection score other than the angle (the angle has its own,
    rule_attacks.RuleAttack): targeted PGD toward the `k` likeliest wrong classes, ascending
    min(logit margin of the target, κ·(threshold − the target's score)), so the input ends
    wrong AND below the score's threshold (accepted). Per example the first accepted-and-wrong
    iterate, else the last. `score` is "max softmax probability" (score: −p_target) or
    "Mahalanobis distance" (score: the distance to the target's class mean, an upper bound on
    the distance to the closest mean that the detector uses)."""

    eps: float
    score: str
    threshold: float
    maha: Mahalanobis | None = field(default=None, repr=False)  # fit on training features, not a setting
    k: int = 3
    steps: int = 30
    kappa: float = 10.0

    def _scores(self, model: ConvNet, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (N, K), per-class score (N, K): higher = more suspicious)."""
        feat = model.feature(x)
        logits, _ = model.classifier(feat)
        if self.score.startswith("max softmax"):
            return logits, -torch.softmax(logits, 1)
        assert self.maha is not None
        mu = torch.as_tensor(self.maha.means, dtype=feat.dtype, device=feat.device)
        prec = torch.as_tensor(self.maha.precision, dtype=feat.dtype, device=feat.device)
        d = feat.unsqueeze(1) - mu.unsqueeze(0)  # (N, K, d)
        return logits, torch.einsum("nkd,de,nke->nk", d, prec, d)

    def _won(self, logits: Tensor, per_class: Tensor, y: Tensor) -> Tensor:
        label = logits.argmax(1)
        s = per_class.gather(1, label.view(-1, 1)).squeeze(1) if self.score.startswith("max softmax") \
            else per_class.amin(1)
        return (label != y) & (s <= self.threshold)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        assert isinstance(model, ConvNet)
        step = 2.5 * self.eps / self.steps
        with eval_mode(model):
            with torch.no_grad():
                logits0, _ = model(x)
            order = logits0.masked_fill(torch.nn.functional.one_hot(y, logits0.shape[1]).bool(),
                                        -float("inf")).argsort(1, descending=True)
            best, won = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for ti in range(min(self.k, logits0.shape[1] - 1)):
                t = order[:, ti]
                x_cur = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
                for it in range(self.steps + 1):
                    x_cur = x_cur.detach().requires_grad_(True)
                    logits, per_class = self._scores(model, x_cur)
                    with torch.no_grad():
                        ok = self._won(logits, per_class, y) & ~won
                        best[ok], won = x_cur.detach()[ok], won | ok
                        if ti == 0 and it == self.steps:  # not won: the last iterate toward the likeliest class
                            best[~won] = x_cur.detach()[~won]
                    if it == self.steps or bool(won.all()):
                        break
                    other = logits.masked_fill(torch.nn.functional.one_hot(t, logits.shape[1]).bool(),
                                               -float("inf")).amax(1)
                    margin = logits.gather(1, t.view(-1, 1)).squeeze(1) - other
                    slack = self.threshold - per_class.gather(1, t.view(-1, 1)).squeeze(1)
                    obj = torch.minimum(margin, self.kappa * slack)
                    (g,) = torch.autograd.grad(obj.sum(), x_cur)
                    x_cur = project(x_cur.detach() + step * g.sign(), x, self.eps)
        return best.detach()


def detector_table(runner: AttackRunner, clean: Judged, model: ConvNet | None) -> list[Detector]:
    """The three rejection scores on PGD's, the adaptive and the rule attack's inputs, the adaptive
    attacks on the two other scores, and the misclassification row."""
    cfg, t = runner.cfg, runner.t
    names = [n for n in (f"pgd-{cfg.pgd_steps}", "apgd-ce", "adaptive", "rule") if n in runner.judged]
    if not names:
        return []
    train, val = splits(t.manifest, cfg)
    maha: Mahalanobis | None = None
    if model is not None:
        fit = train if not cfg.n_feature_fit else train.subset(slice(0, cfg.n_feature_fit))
        maha = Mahalanobis.fit(features_of(model, fit.images), fit.labels.numpy(), t.manifest.num_classes)

    def scores(x: Tensor, j: Judged) -> Scores:
        return Scores.of(j, maha.distance(features_of(model, x)) if maha is not None and model is not None else None)

    val_scores = scores(val.images, judge(t.onnx_model, val.images, val.labels, t.rule, "validation"))
    clean_scores = scores(t.x, clean)
    false_reject = t.manifest.calibration.target_false_reject_rate
    rho = t.rule.rho
    found = [detector(n, clean_scores, clean, scores(runner.inputs[n], runner.judged[n]), runner.judged[n],
                      val_scores, rho, false_reject) for n in names]
    for name in ("max softmax probability", "Mahalanobis distance") if model is not None else ():
        if name.startswith("Mahalanobis") and maha is None:
            continue
        assert model is not None
        threshold = float(np.quantile(val_scores.named()[name], 1 - false_reject))
        attack = ScoreAttack(t.eps, name, threshold, maha, 3, cfg.rule_steps, cfg.rule_kappa)
        slug = "adaptive-msp" if name.startswith("max") else "adaptive-mahalanobis"
        x_adv = runner.craft(slug, attack, model, runner.n(cfg.n_rule), settings(attack), cfg.seed)
        j = t.judge(x_adv, slug)
        runner.also_judged.append(j)
        adv_scores = scores(x_adv, j)
        d = detector(f"adaptive on {name}", clean_scores, clean, adv_scores, j, val_scores, rho, false_reject)
        broken = ~j.correct & (adv_scores.named()[name] <= threshold)
        runner.say(f"{slug}: the {name} rule defends {100 * (1 - broken.mean()):.1f} % of {j.n}")
        if d is not None:
            d.adaptive_against, d.score_defended_rate = name, float(1 - broken.mean())
        found.append(d)
    found.append(misclassification_detector(clean_scores, clean, val_scores, rho, false_reject))
    return [d for d in found if d is not None]

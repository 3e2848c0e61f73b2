"""PNG figures of an evaluation (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.evaluation.schema import Report
from training.evaluation.scoring import Judged, Outcome


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(plt, fig, path: Path) -> str:  # type: ignore[no-untyped-def]
    """Lay out, write (whole or not at all) and close a figure; its file name, for the report."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def roc_curve(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-reject rate of clean, catch rate of adversarial) for 'reject iff ratio > t'
    over all thresholds t, from strict (nothing rejected) to lax (everything rejected)."""
    ts = np.unique(np.concatenate([neg, pos, [np.inf]]))[::-1]
    fpr = np.array([(neg > t).mean() for t in ts] + [1.0])
    tpr = np.array([(pos > t).mean() for t in ts] + [1.0])
    return fpr, tpr


def write_figures(outcome: Outcome, out: Path) -> list[str]:
    """The report's PNG figures into `out`; returns their file names."""
    r = outcome.report
    clean = outcome.clean
    assert clean is not None
    pgd = next((j for k, j in outcome.judged.items() if k.startswith("pgd")), None)
    adaptive = outcome.judged.get("adaptive")
    files = [angle_histogram(r, clean, pgd, adaptive, out), detector_roc(r, clean, pgd, adaptive, out),
             *report_figures(r, out)]
    return [f for f in files if f is not None]


def report_figures(r: Report, out: Path) -> list[str]:
    """The figures that need report.json alone (accuracy vs eps, per-attack bars): they can be
    redrawn from a committed report."""
    return [f for f in (eps_sweep_figure(r, out), attack_bars(r, out)) if f is not None]


def angle_histogram(r: Report, clean: Judged, pgd: Judged | None, adaptive: Judged | None, out: Path) -> str | None:
    """Angle-ratio histograms (clean accepted/rejected, PGD, adaptive) with the thresholds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    allr = np.concatenate([clean.ratio] + [j.ratio for j in (pgd, adaptive) if j])
    lo = min(float(np.percentile(allr, 0.5)), r.rho, 1.0)
    hi = max(float(np.percentile(allr, 99.5)), r.rho, 1.0)
    pad = 0.05 * (hi - lo) + 1e-3
    bins = np.linspace(lo - pad, hi + pad, 60)
    ax.hist(clean.ratio[clean.accepted], bins, alpha=0.5, label="clean, accepted", density=True)
    if (~clean.accepted).any():
        ax.hist(clean.ratio[~clean.accepted], bins, alpha=0.5, label="clean, rejected", density=True)
    for j, lab in ((pgd, "PGD adversarial"), (adaptive, "adaptive adversarial")):
        if j is not None:
            ax.hist(j.ratio, bins, histtype="step", lw=2, label=lab, density=True)
    ax.axvline(r.rho, color="k", ls="--", label=f"calibrated rho = {r.rho:.3f}")
    ax.axvline(1.0, color="gray", ls=":", label="paper rho = 1")
    ax.set_xlabel("angle ratio theta / (theta* + theta_sigma) of the predicted class (reject if > rho)")
    ax.set_ylabel("density")
    ax.set_title(f"{r.model.name} {r.model.version}: angles, eps = {r.eps:g}")
    ax.legend(fontsize=8)
    return _saved(plt, fig, out / "angle_hist.png")


def detector_roc(r: Report, clean: Judged, pgd: Judged | None, adaptive: Judged | None, out: Path) -> str | None:
    """ROC of the angle ratio as a detector of misclassified attacked inputs."""
    plt = _plt()
    if pgd is not None or adaptive is not None:
        fig, ax = plt.subplots(figsize=(5, 5))
        for j, lab in ((pgd, "PGD"), (adaptive, "adaptive")):
            if j is None:
                continue
            pos = j.ratio[~j.correct] if (~j.correct).any() else j.ratio
            fpr, tpr = roc_curve(clean.ratio, pos)
            det = next((d for d in r.detectors if d.attack == j.name), None)
            auc = f" AUC {det.auc:.3f}" if det else ""
            (line,) = ax.plot(fpr, tpr, label=f"{lab}{auc}")
            for rho, mk in ((r.rho, "o"), (1.0, "s")):
                ax.plot([(clean.ratio > rho).mean()], [(pos > rho).mean()], mk, color=line.get_color(), ms=8)
        ax.plot([], [], "ko", label=f"calibrated rho = {r.rho:.3f}")
        ax.plot([], [], "ks", label="rho = 1")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.5)
        ax.set_xlabel("clean false-reject rate")
        ax.set_ylabel("adversarial catch rate (misclassified attacked inputs)")
        ax.set_title("angle ratio as attack detector")
        ax.legend(fontsize=8, loc="lower right")
        return _saved(plt, fig, out / "roc.png")
    return None


def eps_sweep_figure(r: Report, out: Path) -> str | None:
    """Robust accuracy, defended and reject rates vs eps."""
    plt = _plt()
    sweep = r.sanity.eps_sweep
    if sweep is not None:
        e = [p.eps for p in sweep.points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(e, [p.robust_accuracy for p in sweep.points], "o-", label="robust accuracy")
        ax.plot(e, [p.defended_rate for p in sweep.points], "s-", label="defended (rejected or correct)")
        ax.plot(e, [p.reject_rate for p in sweep.points], "^:", label="reject rate")
        ax.axvline(r.eps, color="gray", ls=":", label=f"evaluation eps = {r.eps:g}")
        ax.set_xlabel("eps (L-inf)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"PGD-{sweep.attack['steps']} vs eps (n = {sweep.n_examples})")
        ax.legend(fontsize=8)
        return _saved(plt, fig, out / "eps_sweep.png")
    return None


def attack_bars(r: Report, out: Path) -> str | None:
    """Robust accuracy and defended rate per attack."""
    plt = _plt()
    done = [a for a in r.attacks if a.status == "ok"]
    if done:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(done) + 2), 4))
        xs = np.arange(len(done) + 1)
        names = ["clean"] + [a.name for a in done]
        acc = [r.clean_accuracy] + [a.robust_accuracy or 0 for a in done]
        dfd = [r.clean_defended_rate] + [a.defended_rate or 0 for a in done]
        ax.bar(xs - 0.2, acc, 0.4, label="robust accuracy")
        ax.bar(xs + 0.2, dfd, 0.4, label="defended")
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"eps = {r.eps:g}, rho = {r.rho:.3f}")
        return _saved(plt, fig, out / "attacks.png")
    return None

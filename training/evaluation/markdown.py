"""report.md from a Report (the same numbers as report.json, for people)."""

from __future__ import annotations

from training.evaluation.schema import AttackResult, Report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _budget(a: AttackResult) -> str:
    p = {k: v for k, v in a.params.items() if k not in ("eps", "loss", "library", "knows", "rho", "substitute")}
    return ", ".join(f"{k}={v}" for k, v in p.items())


def render_report_markdown(r: Report) -> str:
    L: list[str] = []
    L.append(f"# Defense evaluation: {r.model.name} {r.model.version}\n")
    weights = {"checkpoint": f"checkpoint `{r.model.checkpoint}`",
               "model.onnx": "the PyTorch model rebuilt from model.onnx's own weights",
               None: "none (white-box attacks skipped)"}[r.model.white_box_weights]
    L.append(f"- model.onnx sha256 `{r.model.sha256}`; dataset {r.model.dataset}; white-box gradients from "
             f"{weights}"
             + (f" (ONNX parity {r.model.checkpoint_parity_max_abs_diff:.1e})"
                if r.model.checkpoint_parity_max_abs_diff is not None else ""))
    L.append(f"- threat model: L-inf, eps = {r.eps:g} on [0, 1] images; {r.n_examples} {r.split} examples "
             "(each attack on a prefix of them, see n)"
             + (" - validation: for choosing a variant, not a result" if r.split == "validation" else ""))
    L.append(f"- verdicts: ONNX Runtime + app.verdict.geodesic_verdict, rho = {r.rho:.4f} ({r.rho_source}); "
             "reject iff theta > rho (theta* + theta_sigma) of the predicted class")
    L.append(f"- created {r.created_at:%Y-%m-%d %H:%M} UTC in {r.seconds:.0f}s; command `{r.command}`\n")
    L.append("Definitions: *robust accuracy* = label correct, ignoring rejection; *reject* = fraction of the "
             "attacked inputs rejected; *defended* = rejected OR correct; *success* = accepted AND wrong "
             "(= 1 - defended), the attacker's win.\n")
    if r.warnings:
        L.append("## Warnings\n")
        L.extend(f"- **{w}**" for w in r.warnings)
        L.append("")
    L.append("## Clean\n")
    L.append(f"accuracy {_pct(r.clean_accuracy)}, reject rate {_pct(r.clean_reject_rate)} "
             f"(at rho = 1: {_pct(r.clean_rho1_reject_rate)}), accuracy on accepted {_pct(r.clean_accepted_accuracy)}, "
             f"defended {_pct(r.clean_defended_rate)}\n")
    L += _attacks_section(r)
    L += _worst_case_section(r)
    L += _detectors_section(r)
    L += _foreign_section(r)
    L += _sanity_section(r)
    if r.figures:
        L.append("\n## Figures\n")
        L.extend(f"![{f}]({f})" for f in r.figures)
    return "\n".join(L) + "\n"


def _attacks_section(r: Report) -> list[str]:
    """The attack table, then how PGD's restarts converged."""
    L: list[str] = []
    L.append("## Attacks\n")
    L.append("| attack | kind | n | robust acc. | reject | defended | success | defended at rho=1 | budget | s |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for a in r.attacks:
        if a.status == "skipped":
            L.append(f"| {a.name} | {a.kind} | - | skipped: {a.reason} | | | | | {_budget(a)} | |")
            continue
        L.append(f"| {a.name} | {a.kind} | {a.n_examples} | {_pct(a.robust_accuracy)} | {_pct(a.reject_rate)} | "
                 f"{_pct(a.defended_rate)} | {_pct(a.success_rate)} | {_pct(a.rho1_defended_rate)} | "
                 f"{_budget(a)} | {a.seconds:.0f} |")
    L.append("")
    for a in r.attacks:
        if a.params.get("restart_schedule"):
            what = "defended_rate" if a.name == "rule" else "robust_accuracy"
            steps = ", ".join(f"{p['restarts']}: {_pct(p[what])}" for p in a.params["restart_schedule"])
            state = "converged" if a.params.get("converged") else "stopped at the restart cap"
            L.append(f"{a.name} restarts doubled until doubling lowers {what.replace('_', ' ')} by at most "
                     f"{100 * a.params['restart_tolerance']:g} points ({state}): restarts: {what.replace('_', ' ')} "
                     f"{steps}\n")
    return L

def _worst_case_section(r: Report) -> list[str]:
    """Per example, the worst over all attacks."""
    L: list[str] = []
    L.append("## Worst case over all attacks\n")
    for wc in (r.worst_case, r.worst_case_all_examples):
        if wc is None:
            continue
        L.append(f"- {wc.note}: n = {wc.n_examples}: robust accuracy **{_pct(wc.robust_accuracy)}**, "
                 f"defended **{_pct(wc.defended_rate)}** (broken: {_pct(wc.success_rate)})")
    L.append(f"- attacks: {', '.join(r.worst_case.attacks)}\n")
    return L

def _detectors_section(r: Report) -> list[str]:
    """The angle ratio as a detector, beside the max-softmax and Mahalanobis scores."""
    L: list[str] = []
    if r.detectors:
        L.append("## The angle ratio as an attack detector\n")
        L.append("| attack | AUC | clean rejected at rho | adversarial caught at rho | "
                 "clean rejected at rho=1 | adversarial caught at rho=1 |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for d in r.detectors:
            L.append(f"| {d.attack} | {d.auc:.3f} | {_pct(d.clean_reject_at_rho)} | "
                     f"{_pct(d.adversarial_catch_at_rho)} | "
                     f"{_pct(d.clean_reject_at_rho1)} | {_pct(d.adversarial_catch_at_rho1)} |")
        L.append("\n(adversarial = the attacked inputs the attack misclassified)\n")
        if any(d.scores for d in r.detectors):
            L.append("### Geodesic rejection beside two standard rejection scores\n")
            L.append("Each threshold is set on the validation split to the same clean false-reject rate as rho. "
                     "Only the angle rule faces an adaptive attack; the other scores face attacks that ignore "
                     "them, so their catch rates are upper bounds.\n")
            L.append("| attack | score | AUROC | clean rejected (validation / test) | adversarial caught |")
            L.append("| --- | --- | --- | --- | --- |")
            for d in r.detectors:
                L.extend(f"| {d.attack} | {s.score} | {s.auroc:.3f} | {_pct(s.validation_reject)} / "
                         f"{_pct(s.clean_reject)} | {_pct(s.adversarial_catch)} |" for s in d.scores)
            L.append("")
        aimed = [d for d in r.detectors if d.adaptive_against]
        if aimed:
            L.append("Each score attacked adaptively (the attack knows its threshold): the defended rate of "
                     "'reject above that score's threshold' under the attack aimed at it.\n")
            L.extend(f"- {d.adaptive_against}: defended {_pct(d.score_defended_rate)}" for d in aimed)
            L.append("")
    return L


def _foreign_section(r: Report) -> list[str]:
    """Inputs that are not clothing: the out-of-distribution table and the distal attack."""
    L: list[str] = []
    if r.ood:
        L.append("## Inputs that are not clothing\n")
        L.append("| kind | seen in training | n | rejected |\n| --- | --- | --- | --- |")
        L.extend(f"| {o.kind} | {'yes' if o.trained else 'no (held out)'} | {o.n_examples} | {_pct(o.reject_rate)} |"
                 for o in r.ood)
        L.append("")
    if r.distal:
        L.append("Distal inputs: from noise or a constant image, PGD within eps to get ANY class accepted "
                 "(the attacker knows the rule; lower is better).\n")
        L.append("| start | eps | n | accepted before | accepted after the attack |\n| --- | --- | --- | --- | --- |")
        L.extend(f"| {d.start} | {d.eps:g} | {d.n_examples} | {_pct(d.start_accepted_rate)} | "
                 f"{_pct(d.accepted_rate)} |" for d in r.distal)
        L.append("")
    if r.distal_skipped:
        L.append(f"Distal inputs: the attack was skipped ({r.distal_skipped}).\n")
    return L


def _sanity_section(r: Report) -> list[str]:
    """Noise, PGD budget, accuracy vs eps, gradient-free vs white-box."""
    L: list[str] = []
    s = r.sanity
    L.append("## Sanity checks\n")
    L.append(f"- noise and constant images: {s.noise.verdict}" if s.noise else "- noise images: not run")
    if s.pgd_budget:
        b = s.pgd_budget
        L.append(f"- PGD budget (n = {b.n_examples}): {b.verdict}. Defended {_pct(b.base_defended_rate)} -> "
                 f"{_pct(b.doubled_defended_rate)}.")
    else:
        L.append("- PGD budget: not run")
    if s.eps_sweep:
        e = s.eps_sweep
        L.append(f"- accuracy vs eps (PGD-{e.attack['steps']}, n = {e.n_examples}): {e.verdict}")
        L.append("\n| eps | robust acc. | reject | defended | defended under the rule attack |\n"
                 "| --- | --- | --- | --- | --- |")
        L.extend(f"| {p.eps:g} | {_pct(p.robust_accuracy)} | {_pct(p.reject_rate)} | {_pct(p.defended_rate)} | "
                 f"{_pct(p.rule_defended_rate)} |" for p in e.points)
        L.append("")
    else:
        L.append("- accuracy vs eps: not run")
    if s.gradient_free:
        L.append(f"- gradient-free vs white-box (n = {s.gradient_free.n_examples}): {s.gradient_free.verdict}")
    else:
        L.append("- gradient-free vs white-box: not run")
    if s.rule:
        L.append(f"- attacks on the verdict: {s.rule.verdict}")
    return L

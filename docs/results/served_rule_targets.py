"""The targets of the served-rule campaign (fashion-mnist-dsphere 4.0.0, fashion-mnist-baseline 3.0.0),
each model's figure beside each target, read from the evaluations' report.json files:

    .venv/bin/python docs/results/served_rule_targets.py docs/results/fashion-mnist-baseline-3.0.0/report.json \\
        docs/results/fashion-mnist-dsphere-4.0.0/report.json

The first report is the served default's. Its worst-case defended rate is held to 80 % (floor 78.3 %,
the baseline 2.0.0's at n = 300); every other report is held to within 2 points of it (the paired
test on the same images is `python -m training compare`'s).
"""
import json
import sys
from pathlib import Path

TARGET, FLOOR, WITHIN = 0.80, 0.783, 0.02
FOOLED_ATTACKS = ("pgd-100", "apgd-ce")


def _pct(v: float) -> str:
    return f"{v * 100:.1f} %"


def rows(report: dict, default: dict | None) -> list[tuple[str, str, bool]]:
    """(target, this report's figure, met) for one report; `default` is the served default's report
    (None: this is it)."""
    worst = report["worst_case"]["defended_rate"]
    out = []
    if default is None:
        out.append((f"worst-case defended >= {TARGET * 100:.0f} % (floor {FLOOR * 100:.1f} %)",
                    _pct(worst) + ("" if worst >= TARGET else " (above the floor)" if worst >= FLOOR else
                                      " (below the floor)"), worst >= TARGET))
    else:
        gap = default["worst_case"]["defended_rate"] - worst
        out.append((f"worst-case defended within {WITHIN * 100:.0f} points of the served default",
                    f"{_pct(worst)} ({abs(gap) * 100:.1f} points {'behind' if gap > 0 else 'ahead'})", gap <= WITHIN))
    catches = {d["attack"]: d["adversarial_catch_at_rho"] for d in report["detectors"]
               if d["attack"] in FOOLED_ATTACKS and d.get("adaptive_against") is None}
    for name in FOOLED_ATTACKS:
        c = catches.get(name)
        out.append((f"{name}-fooled inputs rejected >= 50 %", "not run" if c is None else _pct(c),
                    c is not None and c >= 0.5))
    ood = report.get("ood") or []
    low = min(ood, key=lambda o: o["reject_rate"]) if ood else None
    out.append(("every out-of-distribution kind rejected >= 95 %",
                "not run" if low is None else f"lowest {_pct(low['reject_rate'])} ({low['kind']}, {len(ood)} kinds)",
                low is not None and low["reject_rate"] >= 0.95))
    distal = [d for d in report.get("distal") or [] if abs(d["eps"] - report["eps"]) < 1e-9]
    high = max(distal, key=lambda d: d["accepted_rate"]) if distal else None
    out.append((f"distal at eps {report['eps']} accepted <= 10 % from every start",
                "not run" if high is None else f"highest {_pct(high['accepted_rate'])} ({high['start']})",
                high is not None and high["accepted_rate"] <= 0.10))
    out.append(("clean accuracy >= 85 %", _pct(report["clean_accuracy"]), report["clean_accuracy"] >= 0.85))
    acc = report["clean_accepted_accuracy"]
    out.append(("accuracy on accepted clean inputs >= 90 %", _pct(acc), acc >= 0.90))
    return out


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    for i, r in enumerate(reports):
        m = r["model"]
        role = "the served default" if i == 0 else "beside the served default"
        print(f"\n{m['name']} {m['version']} ({role}; n = {r['worst_case']['n_examples']}):\n")
        print("| target | figure | |\n| --- | --- | --- |")
        for target, figure, met in rows(r, None if i == 0 else reports[0]):
            print(f"| {target} | {figure} | {'met' if met else '**missed**'} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: served_rule_targets.py SERVED_DEFAULT_REPORT [OTHER_REPORT...]")
    main(sys.argv[1:])

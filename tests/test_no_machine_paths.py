"""Committed artifacts hold no absolute path of the machine that made them: reports, comparison
pages, manifests, checkpoint JSON and docs record paths relative to the repository's root
(training/portable.py), so that they read the same on any checkout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from training.cli_app import command_line
from training.portable import portable_path

REPO = Path(__file__).resolve().parents[1]
ARTIFACT_DIRS = ("docs", "model_store", "checkpoints")
# a machine's own folders, not preceded by a word character (runs/tmp/x and https://host/home/ are not)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|tmp|home|Users|mnt|var/folders|private/var)/[^\s\"'`)]*")


def _artifacts() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", *ARTIFACT_DIRS], cwd=REPO, capture_output=True,
                                check=True).stdout.decode().split("\0")
        return [REPO / p for p in listed if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file there
        return [p for d in ARTIFACT_DIRS for p in sorted((REPO / d).rglob("*")) if p.is_file()]


def machine_paths(text: str) -> list[str]:
    return MACHINE_PATH.findall(text)


def test_the_pattern_finds_machine_paths_and_nothing_else() -> None:
    assert machine_paths('"path": "/work/main/runs/v2/staging/x/2.0.0"') == ["/work/main/runs/v2/staging/x/2.0.0"]
    assert machine_paths("--out /tmp/eval and `/home/me/x` and /root/.cache/y") == [
        "/tmp/eval", "/home/me/x", "/root/.cache/y"]
    assert machine_paths("runs/tmp/x, https://example.org/home/page, /usr/share/datasets/fashion-mnist") == []


def test_no_committed_artifact_holds_a_machine_path() -> None:
    found = {}
    for path in _artifacts():
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary: model.onnx, safetensors, npz, png
            continue
        hits = machine_paths(data.decode("utf-8", errors="replace"))
        if hits:
            found[str(path.relative_to(REPO))] = hits[:3]
    assert not found, f"absolute paths of the machine that made them (record them relative): {found}"


def test_recorded_paths_and_command_lines_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    inside, outside = tmp_path / "runs" / "x" / "final", Path("/elsewhere/ckpt")
    assert portable_path(inside) == "runs/x/final" and portable_path("runs/y") == "runs/y"
    assert portable_path(outside) == "/elsewhere/ckpt"
    monkeypatch.setattr(sys, "argv", ["training", "evaluate", str(inside), f"--out={tmp_path / 'eval'}", "--n", "3"])
    assert command_line() == "python -m training evaluate runs/x/final --out=eval --n 3"

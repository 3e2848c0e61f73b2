"""Training loop, checkpoints, angle statistics, CLI errors, distributed training, and
ONNX export whose manifest metrics are recomputed from the files alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.manifest import Manifest
from app.verdict import geodesic_verdict
from training.angle_stats import compute_angle_stats
from training.attacks import predict
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import Dataset
from training.distributed import weights_digest
from training.export import export_version

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_training_on_real_data_learns(tiny_run: Path, fashion_test: Dataset) -> None:
    model, ckpt = load_checkpoint(tiny_run)
    assert ckpt.learned is True
    logits, _ = predict(model, fashion_test.images[:2000])
    acc = float((logits.argmax(1) == fashion_test.labels[:2000]).float().mean())
    assert acc > 0.45, acc  # chance is 0.10
    summary = json.loads((tiny_run.parent / "summary.json").read_text())
    assert summary["learned"] and summary["n_train"] == 4000


def test_checkpoint_round_trip(tiny_run: Path, tmp_path: Path) -> None:
    model, ckpt = load_checkpoint(tiny_run)
    save_checkpoint(tmp_path / "copy", model, ckpt)
    again, ckpt2 = load_checkpoint(tmp_path / "copy")
    assert weights_digest(again) == weights_digest(model)
    assert ckpt2.model_config == ckpt.model_config and ckpt2.angle_stats == ckpt.angle_stats
    meta = (tmp_path / "copy" / "checkpoint.json").read_text()
    assert not list(tmp_path.glob("*.safetensors")) and "pickle" not in meta


def test_angle_stats_equal_brute_force(tiny_run: Path, fashion_test: Dataset) -> None:
    model, _ = load_checkpoint(tiny_run)
    x, y = fashion_test.images[:500], fashion_test.labels[:500]
    stats = compute_angle_stats(model, x, y, 10, batch_size=64)
    with torch.no_grad():
        feats = model.feature(x).double()
    w = model.classifier.linear.weight.detach().double()
    for j in range(10):
        f = feats[y == j]
        cos = (f @ w[j]) / (f.norm(dim=1) * w[j].norm())
        theta = torch.rad2deg(torch.acos(cos.clamp(-1, 1))).numpy()
        assert stats.mean_deg[j] == pytest.approx(theta.mean(), abs=1e-3)
        assert stats.std_deg[j] == pytest.approx(theta.std(), abs=1e-3)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["train", "--corr", "bogus"], "unknown corr 'bogus'"),
    (["train", "--data-dir", "/nonexistent/dir"], "apt-get install -y dataset-fashion-mnist"),
    (["train", "--bogus-option"], "No such option"),
    (["export", "/nonexistent/ckpt"], "is not a checkpoint"),
])
def test_bad_cli_input_is_one_line(args: list[str], needle: str) -> None:
    r = run_cli(*args)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_export_then_recompute_metrics_from_files(tiny_run: Path, tmp_path: Path, fashion_test: Dataset) -> None:
    path = export_version(tiny_run, tmp_path, "tiny", "1", n_test=1000, n_attack=100, pgd_steps=3)
    manifest = Manifest.model_validate_json((path / "manifest.json").read_text())
    graph = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(graph)
    assert [o.name for o in graph.graph.output] == ["logits", "cosines"]
    assert graph.opset_import[0].version >= 17
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = fashion_test.images[:1000].numpy()
    logits, cosines = sess.run(["logits", "cosines"], {sess.get_inputs()[0].name: x})
    model, ckpt = load_checkpoint(tiny_run)
    t_logits, t_cos = predict(model, torch.from_numpy(x[:300]))
    np.testing.assert_allclose(logits[:300], t_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(cosines[:300], t_cos.numpy(), atol=1e-4)
    v = geodesic_verdict(logits, cosines, manifest.angle_mean_deg, manifest.angle_std_deg, manifest.rho)
    y = fashion_test.labels[:1000].numpy()
    assert manifest.metrics.clean_accuracy == pytest.approx(float((v.labels == y).mean()), abs=1e-9)
    assert manifest.metrics.clean_reject_rate == pytest.approx(float((~v.accepted).mean()), abs=1e-9)
    assert manifest.metrics.pgd_defended_rate >= manifest.metrics.pgd_robust_accuracy
    # The angle histogram counts the very images behind the angle statistics (the run's 4,000
    # training images), and its binned mean is the manifest's mean within half a bin.
    hist = manifest.angle_histogram
    assert hist is not None and ckpt.angle_stats is not None
    assert [sum(row) for row in hist.counts] == list(ckpt.angle_stats.counts)
    edges = np.asarray(hist.bin_edges_deg)
    centers, half_bin = (edges[:-1] + edges[1:]) / 2, float(np.diff(edges).max()) / 2
    for row, mean in zip(hist.counts, manifest.angle_mean_deg, strict=True):
        assert float(np.average(centers, weights=row)) == pytest.approx(mean, abs=half_bin)
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_version(tiny_run, tmp_path, "tiny", "1")


def test_torchrun_two_cpu_processes_end_with_equal_weights(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "training", "train", "--out", str(tmp_path / "ddp"), "--limit-train", "1024",
                        "--iterations", "8", "--batch-size", "64", "--n-val", "500", "--quiet",
                        "--checkpoint-every", "0", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    digests = [(tmp_path / "ddp" / f"rank{i}.digest").read_text() for i in range(2)]
    assert digests[0] == digests[1]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_sha256"] == digests[0]
    # an 8-iteration run does not learn: the command must say so instead of pretending
    # (torchrun exits 1 when a rank exits 3)
    assert r.returncode == 0 or "error: the run did not learn" in r.stderr, r.stderr[-2000:]


def test_a_baseline_cnn_is_served_by_name_with_geodesic_rejection(tmp_path: Path, fashion_test: Dataset) -> None:
    """The baseline CNN exports like a D-SphereNet (its FC feature and last-layer weights give
    the angles) and the real service serves it by name, with verdicts."""
    from support.fashion_mnist import png_bytes
    from support.server import start_server
    from training.config import TrainConfig
    from training.models import ModelConfig
    from training.train import train

    torch.set_num_threads(1)
    run = tmp_path / "baseline"
    train(ModelConfig(arch="baseline", head="softmax", widths=(8, 16, 16), fc_dim=32),
          TrainConfig(epochs=3, limit_train=4000, n_val=500, checkpoint_every=0, batch_size=64, lr=3e-3),
          run, show_progress=False)
    export_version(run, tmp_path / "store", "fashion-mnist-baseline", "1.0.0", n_test=500, n_attack=20, pgd_steps=2)
    srv = start_server({"DSPHERE_MODEL_STORE": str(tmp_path / "store"), "DSPHERE_MODEL_NAME": "fashion-mnist-baseline"})
    try:
        with srv.client(timeout=10) as c:
            images = (fashion_test.images[:20, 0].numpy() * 255).round().astype(np.uint8)
            answers = [c.post("/classify", content=png_bytes(img), headers={"content-type": "image/png"}).json()
                       for img in images]
            detail = c.get("/models/fashion-mnist-baseline").json()
    finally:
        srv.stop()
    assert {a["model"]["name"] for a in answers} == {"fashion-mnist-baseline"}
    assert sum(a["label"] == int(y) for a, y in zip(answers, fashion_test.labels[:20], strict=True)) >= 10
    assert all(a["verdict"] in ("accept", "reject") and 0 <= a["angle_deg"] <= 180 for a in answers)
    assert detail["served_version"] == "1.0.0" and detail["manifest"]["rho"] > 0

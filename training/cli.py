"""`python -m training ...`: train, export, evaluate, reproduce.

Every user error (unknown corr, missing data, bad checkpoint, existing version) ends with
one line `error: ...` on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from training.cli_app import app, command_line
from training.cli_values import comma_list, format_list
from training.config import TrainConfig

_TRAIN = TrainConfig()  # the defaults the options below repeat (tests/training/test_cli_defaults.py)

EXIT_USER_ERROR = 2
EXIT_DID_NOT_LEARN = 3
EXIT_OVERFITTING = 4


@app.command()
def train(  # a flat list: one parameter per option, then one call

    out: Annotated[Path, typer.Option(help="run directory (checkpoints last/ and final/, summary.json)")] = Path(
        "runs/default"),
    dataset: Annotated[str, typer.Option(help="fashion-mnist, mnist or cifar10")] = "fashion-mnist",
    data_dir: Annotated[str | None, typer.Option(help="dataset directory (env DSPHERE_DATA_DIR)")] = None,
    download: Annotated[bool, typer.Option(help="download the dataset files first (sha256-verified)")] = False,
    download_url: Annotated[str | None, typer.Option(help="base URL for --download")] = None,
    arch: Annotated[str, typer.Option(help="baseline or dsphere")] = "dsphere",
    corr: Annotated[str, typer.Option(help="cosine, linear, sigmoid, quadratic, truncated")] = "cosine",
    head: Annotated[str, typer.Option(help="softmax, wsoftmax, wm, anneal")] = "wm",
    fc_dim: Annotated[int, typer.Option(help="feature dimension (2 for the Figure 2 models)")] = 256,
    feature_relu: Annotated[bool, typer.Option(help="ReLU on the feature layer")] = True,
    mode: Annotated[str, typer.Option(
        help="natural, fgsm (random start), pgd, nfgsm, trades, or rejection (trains the served verdict)")] = "natural",
    eps: Annotated[float | None, typer.Option(
        help="L-inf radius for adversarial training (default: the dataset's, 0.1 for Fashion-MNIST)")] = None,
    attack_steps: Annotated[int, typer.Option(help="PGD steps")] = 7,
    attack_step_size: Annotated[float | None, typer.Option(help="default 2.5 eps/steps (PGD), 1.25 eps (FGSM)")] = None,
    adv_weight: Annotated[float, typer.Option(
        help="fgsm/pgd: weight of the adversarial loss (1 = pure adversarial)")] = 1.0,
    trades_beta: Annotated[float, typer.Option(help="trades: weight beta of KL(clean || adversarial)")] = 6.0,
    reject_scale: Annotated[float, typer.Option(help="rejection: scale s of the logits s*cos and s*t")] = 10.0,
    reject_cones: Annotated[str, typer.Option(
        help="rejection: served (each class's served threshold rho*(mean+std), measured as the model trains) "
             "or fixed (one cone of cosine --reject-cos)")] = "served",
    reject_cos: Annotated[float, typer.Option(help="rejection, fixed cones: t, cosine of the cone's half-angle")] = 0.5,
    reject_attack_steps: Annotated[int, typer.Option(help="rejection: PGD steps of the training attack")] = 2,
    cone_refresh_every: Annotated[int, typer.Option(
        help="rejection, served cones: iterations between measurements of the cones")] = 25,
    reject_margin: Annotated[float, typer.Option(help="rejection: angular margin m of clean inputs")] = 0.1,
    outlier_fraction: Annotated[float, typer.Option(
        help="rejection: synthetic outliers per batch, as a share of the batch size")] = 0.25,
    outlier_eps: Annotated[float, typer.Option(help="rejection: radius of the worst case around an outlier")] = 0.1,
    shrunk_share: Annotated[float, typer.Option(
        help="rejection: share of attacked rows whose perturbation is shrunk and trained toward correct")] = 0.25,
    natural_epochs: Annotated[float, typer.Option(help="natural epochs before adversarial training")] = 0.0,
    eps_warmup_epochs: Annotated[float, typer.Option(help="epochs of linear eps warm-up")] = 0.0,
    epochs: Annotated[float, typer.Option(help="epochs (overrides --iterations)")] = 0.0,
    iterations: Annotated[int, typer.Option(help="iterations (paper: 30000)")] = 30000,
    batch_size: Annotated[int, typer.Option()] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate, /10 at 1/3 and 2/3 of the run")] = 1e-3,
    lr_milestones: Annotated[str, typer.Option(
        help="fractions of the run where lr drops /10, comma-separated")] = format_list(_TRAIN.lr_milestones),
    wm_init: Annotated[float, typer.Option(help="initial weight multiplier alpha")] = 10.0,
    wm_eta: Annotated[float, typer.Option(help="weight multiplier penalty eta")] = 1e-3,
    ortho_weight: Annotated[float, typer.Option(help="orthogonality regularizer weight")] = 1e-4,
    n_val: Annotated[int, typer.Option(help="validation examples held out of the training set")] = 5000,
    limit_train: Annotated[int, typer.Option(help="use only N training examples (0 = all)")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="iterations between checkpoints")] = 500,
    checkpoint_minutes: Annotated[float, typer.Option(help="at most this many minutes between checkpoints")] = 5.0,
    guard_every: Annotated[int, typer.Option(
        help="iterations between the overfitting guard's validation PGD-10 checks (also at each epoch's end)")] = 500,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue from OUT/last")] = False,
    init_from: Annotated[str | None, typer.Option(help="start from this checkpoint's weights")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a baseline CNN or a D-SphereNet (natural, FGSM, PGD, N-FGSM or TRADES training)."""
    from training.config import TrainConfig
    from training.data import DEFAULT_EPS, load_dataset
    from training.data import download as fetch
    from training.guard import GuardConfig
    from training.models import ModelConfig
    from training.objectives import ObjectiveConfig
    from training.rejection import RejectionConfig
    from training.train import train as run_training

    if download:
        if not download_url:
            raise ValueError("--download needs --download-url")
        fetch(dataset, download_url, data_dir)
    shape = load_dataset(dataset, "test", data_dir).input_shape  # fails early, one line, if data is missing
    model_cfg = ModelConfig.for_input(shape, arch=arch, corr=corr, head=head, fc_dim=fc_dim,
                                      feature_relu=feature_relu, wm_init=wm_init)
    cfg = TrainConfig(dataset=dataset, data_dir=data_dir, mode=mode, eps=DEFAULT_EPS[dataset] if eps is None else eps,
                      attack_steps=attack_steps,
                      attack_step_size=attack_step_size, adv_weight=adv_weight, trades_beta=trades_beta,
                      natural_epochs=natural_epochs,
                      eps_warmup_epochs=eps_warmup_epochs, epochs=epochs, iterations=iterations,
                      batch_size=batch_size, lr=lr, lr_milestones=_fractions(lr_milestones), n_val=n_val,
                      limit_train=limit_train, seed=seed, checkpoint_every=checkpoint_every,
                      checkpoint_minutes=checkpoint_minutes, device=device,
                      objective=ObjectiveConfig(wm_eta=wm_eta, ortho_weight=ortho_weight),
                      guard=GuardConfig(every=guard_every),
                      rejection=RejectionConfig(scale=reject_scale, cones=reject_cones, reject_cos=reject_cos,
                                                attack_steps=reject_attack_steps, cone_refresh_every=cone_refresh_every,
                                                margin=reject_margin,
                                                outlier_fraction=outlier_fraction, outlier_eps=outlier_eps,
                                                shrunk_share=shrunk_share))
    _, ckpt = run_training(model_cfg, cfg, out, resume=resume, command=command_line(), init_from=init_from,
                           show_progress=not quiet)
    m = ckpt.metrics
    if m:
        typer.echo(f"done: {out / 'final'}  val accuracy {m['val_accuracy']:.4f}  "
                   f"{m['iterations']} iterations in {m['train_minutes']:.1f} min")


def _fractions(text: str) -> tuple[float, ...]:
    values = comma_list(text, float, "--lr-milestones", "fractions")
    if any(not 0 < v < 1 for v in values):
        raise ValueError("--lr-milestones: each fraction must be in (0, 1)")
    return values


@app.command()
def export(  # a flat list: one parameter per option, then one call
    checkpoint: Annotated[Path, typer.Argument(
        help="checkpoint directory, or a run directory (takes its best/, else final/)")],
    name: Annotated[str, typer.Option(help="model name in the store")] = "fashion-mnist-dsphere",
    version: Annotated[str | None, typer.Option(help="version string (default: date-based)")] = None,
    store: Annotated[Path, typer.Option(help="model store root")] = Path("model_store"),
    target_reject_rate: Annotated[float, typer.Option(help="clean false-reject rate rho is calibrated to")] = 0.05,
    eps: Annotated[float | None, typer.Option(
        help="threat-model eps (default: the dataset's: 0.1 Fashion-MNIST, 0.3 MNIST, 8/255 CIFAR-10)")] = None,
    pgd_steps: Annotated[int, typer.Option(help="PGD steps for the manifest metrics")] = 20,
    pgd_restarts: Annotated[int, typer.Option(help="PGD restarts for the manifest metrics")] = 1,
    n_test: Annotated[int, typer.Option(help="test examples for metrics (0 = all)")] = 0,
    n_attack: Annotated[int, typer.Option(help="test examples attacked for the PGD metrics (0 = all)")] = 2000,
    data_dir: Annotated[str | None, typer.Option(help="dataset directory")] = None,
    evaluation: Annotated[Path | None, typer.Option(
        help="report.json of `evaluate` on an export of this same checkpoint: the manifest's PGD and "
             "worst-case figures come from it (no attack at export)")] = None,
) -> None:
    """Export a checkpoint to model_store/<name>/<version>/ (model.onnx + manifest.json)."""
    from training.export import export_version

    path = export_version(checkpoint, store, name, version, target_reject_rate=target_reject_rate, eps=eps,
                          pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, n_test=n_test, n_attack=n_attack,
                          data_dir=data_dir, command=command_line(), evaluation=evaluation)
    typer.echo(f"exported {path}")


@app.command()
def keep(
    run: Annotated[Path, typer.Argument(help="run directory (takes best/, else final/) or checkpoint directory")],
    dest: Annotated[Path, typer.Argument(help="where the kept checkpoint goes (e.g. checkpoints/<run>)")],
    stopped: Annotated[str | None, typer.Option(
        help="the run was stopped for good before its end, for this reason: measure best/'s angle statistics "
             "first (as the run's end would have) and record the reason in summary.json")] = None,
) -> None:
    """Copy a run's chosen checkpoint (weights, metadata, the run's summary.json) to a folder
    small enough to commit, so that export and evaluation never need the run again."""
    from training.checkpoint import keep_checkpoint

    if stopped:
        from training.train import seal_stopped_run

        typer.echo(f"sealed {seal_stopped_run(run, stopped)}")
    typer.echo(f"kept {keep_checkpoint(run, dest)}")


@app.command("choose-on-validation")
def choose_on_validation(
    checkpoints: Annotated[list[Path], typer.Argument(help="kept checkpoints (checkpoints/<run>)")],
    must_beat: Annotated[Path | None, typer.Option(
        help="a predecessor's kept checkpoint: exit 1 unless the first checkpoint given beats it")] = None,
) -> None:
    """Rank kept checkpoints by their best validation guard check (defended rate under the served rule;
    training/validation_choice.py); with --must-beat, the gate a new version passes to be published."""
    from training.validation_choice import guard_best, ranking, table

    typer.echo(table(ranking(checkpoints + ([must_beat] if must_beat else []))))
    if must_beat is not None:
        new, old = guard_best(checkpoints[0]), guard_best(must_beat)
        if new.key <= old.key:
            typer.echo(f"{new.checkpoint} does not beat {old.checkpoint} on the validation guard "
                       f"({100 * new.defended_rate:.1f} % vs {100 * old.defended_rate:.1f} %): not published")
            raise SystemExit(1)
        typer.echo(f"{new.checkpoint} beats {old.checkpoint} on the validation guard")


def main() -> None:
    from training.checkpoint import CheckpointError
    from training.data import DataError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _register_commands()
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # user-facing errors: one line, no traceback
        from click.exceptions import ClickException

        from training.guard import CatastrophicOverfitting
        from training.train import TrainingDidNotLearn

        if isinstance(e, TrainingDidNotLearn):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_DID_NOT_LEARN)
        if isinstance(e, CatastrophicOverfitting):
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(EXIT_OVERFITTING)
        if isinstance(e, ClickException) or (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            print(f"error: {e.format_message()}", file=sys.stderr)  # type: ignore[attr-defined]
            sys.exit(int(e.exit_code) or EXIT_USER_ERROR)  # type: ignore[attr-defined]
        if isinstance(e, DataError | CheckpointError | ValueError | FileExistsError | FileNotFoundError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        raise


def _register_commands() -> None:
    """The commands of the other command modules (evaluate, figure2, compare, reproduce, precision)."""
    import training.evaluation.cli  # noqa: F401  (registers its commands on training.cli_app.app)
    import training.precision  # noqa: F401
    import training.reproduce_cli  # noqa: F401

"""A run's checkpoint (and the manifest exported from it) records its options as they ran:
`attack_steps` only for the modes that run it (pgd, trades); rejection runs its own
(`rejection.attack_steps`), fgsm and nfgsm one step, natural none."""

from __future__ import annotations

import pytest

from training.config import TrainConfig, as_ran


@pytest.mark.parametrize("mode, recorded", [("rejection", None), ("nfgsm", None), ("natural", None), ("pgd", 7)])
def test_a_run_records_attack_steps_only_where_its_mode_runs_them(mode: str, recorded: int | None) -> None:
    cfg = TrainConfig(mode=mode)
    assert cfg.to_dict()["attack_steps"] == recorded
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # read back as it ran


def test_a_checkpoint_that_recorded_the_unused_default_resumes_as_the_same_run() -> None:
    """Checkpoints written before recorded attack_steps 7 for every mode: --resume compares `as_ran`."""
    cfg = TrainConfig(mode="rejection")
    assert as_ran({**cfg.to_dict(), "attack_steps": 7}) == cfg.to_dict()

"""The bundled model store (model_store/ of this repository) and what a service started on it serves."""

from __future__ import annotations

from pathlib import Path

from app.model_store import find_version
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BUNDLED_STORE = REPO / "model_store"
MODEL_NAME: str = Settings.model_fields["model_name"].default  # the model the service serves by default


def bundled_version() -> str:
    """The version a service on the bundled store serves by default (DSPHERE_MODEL_VERSION unset,
    i.e. "latest"): the highest version of MODEL_NAME with a manifest, by the service's own rule.
    Raises ModelNotFoundError when the store has none."""
    return find_version(BUNDLED_STORE, MODEL_NAME, "latest")

"""The model store: `<store>/<name>/<version>/{model.onnx, manifest.json}`.

`load_version` verifies a version before anything runs it, in this order:
manifest.json parses and validates against `Manifest` (schema version included),
its name/version match the directories, model.onnx's sha256 equals the manifest's
(hashed from the very bytes handed to the inference runtime, so nothing can change in
between), then the graph's input/outputs, as the runtime serving it reads them, match the manifest.
Any failure raises a `ModelStoreError` whose message names the file. `runner` is what runs requests,
built by app/runtimes.py with the one session of the runtime that serves: the fp32 ONNX Runtime
reference, or a faster path when asked for and backed by the version's precision record, measured
under the served rho (`rho`: a DSPHERE_RHO override; None, the manifest's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.errors import validation_message
from app.manifest import MANIFEST_FILE, MODEL_FILE, OUTPUT_NAMES, REFERENCE, SCHEMA_VERSION, Manifest
from app.runtimes import ModelUnloadable, Runner, Signature, open_runner

log = logging.getLogger("dsphere.model_store")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelStoreError(Exception):
    """A model or version cannot be served; the message says why and names the file."""

    status_code = 409


class ModelNotFoundError(ModelStoreError):
    status_code = 404


class ModelInvalidError(ModelStoreError):
    status_code = 409


def natural_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key: digit runs compare as numbers ("v1.10" > "v1.9", "10" > "9")."""
    parts = re.findall(r"\d+|[^\d]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def list_models(store: Path) -> list[str]:
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name))


def list_versions(store: Path, name: str) -> list[str]:
    """Versions of `name`, oldest first (natural sort)."""
    d = store / name
    if not _SAFE_NAME.match(name) or not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name)), key=natural_key)


def find_version(store: Path, name: str, version: str = "latest") -> str:
    """The concrete version; "latest" is the highest version whose manifest.json exists.

    (Writers should copy model.onnx first and manifest.json last; a version still
    being copied is thus skipped by "latest".)
    """
    if not store.is_dir():
        raise ModelNotFoundError(f"model store {store} does not exist or is not a directory")
    versions = list_versions(store, name)
    if not versions:
        raise ModelNotFoundError(f"model '{name}' not found in {store}")
    if version == "latest":
        complete = [v for v in versions if (store / name / v / MANIFEST_FILE).is_file()]
        if not complete:
            raise ModelNotFoundError(f"model '{name}' has no version with a {MANIFEST_FILE} in {store / name}")
        return complete[-1]
    if version not in versions:
        raise ModelNotFoundError(f"version '{version}' of model '{name}' not found in {store / name}")
    return version


def read_manifest(path: Path) -> Manifest:
    """Parse and validate one manifest.json; ModelInvalidError naming the file otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelInvalidError(f"{path}: missing") from None
    except OSError as exc:
        raise ModelInvalidError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise ModelInvalidError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelInvalidError(f"{path}: must be a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ModelInvalidError(
            f"{path}: unsupported schema_version {data.get('schema_version')!r} (this service reads {SCHEMA_VERSION})"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelInvalidError(f"{path}: invalid manifest: {validation_message(exc.errors())}") from None


@dataclass(frozen=True)
class LoadedModel:
    """A verified version with the runner that serves it (its runtime's one session)."""

    name: str
    version: str
    path: Path
    manifest: Manifest
    sha256: str
    runner: Runner

    @property
    def input_name(self) -> str:
        return self.runner.signature.inputs[0].name

    @property
    def providers(self) -> tuple[str, ...]:
        return self.runner.info.providers

    @property
    def provider(self) -> str:
        return self.providers[0] if self.providers else "unknown"


def load_version(
    store: Path,
    name: str,
    version: str = "latest",
    providers: list[str] | None = None,
    intra_op_threads: int = 0,
    backend: str = REFERENCE[0],
    precision: str = REFERENCE[1],
    rho: float | None = None,
) -> LoadedModel:
    version = find_version(store, name, version)
    vdir = store / name / version
    manifest = read_manifest(vdir / MANIFEST_FILE)
    if manifest.name != name or manifest.version != version:
        raise ModelInvalidError(
            f"{vdir / MANIFEST_FILE}: names {manifest.name}/{manifest.version} but lives in {name}/{version}"
        )
    model_path = vdir / MODEL_FILE
    try:
        model_bytes = model_path.read_bytes()
    except FileNotFoundError:
        raise ModelInvalidError(f"{model_path}: missing") from None
    except OSError as exc:
        raise ModelInvalidError(f"{model_path}: unreadable ({exc.strerror})") from None
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != manifest.sha256:
        raise ModelInvalidError(
            f"{model_path}: sha256 {digest} does not match manifest.json ({manifest.sha256}); refusing to load"
        )

    try:
        runner = open_runner(vdir, model_bytes, digest, (backend, precision), threads=intra_op_threads,
                             rho=manifest.rho if rho is None else rho, providers=providers or ["CPUExecutionProvider"])
    except ModelUnloadable as exc:
        raise ModelInvalidError(f"{model_path}: {exc}") from None
    _check_signature(runner.signature, manifest, model_path)
    return LoadedModel(name, version, vdir, manifest, digest, runner)


def _check_signature(signature: Signature, manifest: Manifest, model_path: Path) -> None:
    """The graph's one input (name, type, [N, C, H, W] with dynamic N) and its outputs (OUTPUT_NAMES,
    each [N, K]) as the manifest says, as the runtime that serves it reads them."""
    inputs, outputs = signature.inputs, signature.outputs
    if len(inputs) != 1:
        raise ModelInvalidError(f"{model_path}: expected exactly one input, found {[i.name for i in inputs]}")
    inp = inputs[0]
    out_names = [o.name for o in outputs]
    if sorted(out_names) != sorted(OUTPUT_NAMES) or len(out_names) != len(OUTPUT_NAMES):
        raise ModelInvalidError(f"{model_path}: outputs must be exactly {list(OUTPUT_NAMES)}, found {out_names}")
    if inp.name != manifest.input.name:
        raise ModelInvalidError(f"{model_path}: input is named '{inp.name}', manifest says '{manifest.input.name}'")
    if inp.type != "tensor(float)":
        raise ModelInvalidError(f"{model_path}: input type {inp.type}, expected tensor(float)")
    dims = list(inp.dims)
    if len(dims) != 4 or isinstance(dims[0], int) or tuple(dims[1:]) != tuple(manifest.input.shape):
        raise ModelInvalidError(
            f"{model_path}: input shape {dims} does not match manifest [N, {', '.join(map(str, manifest.input.shape))}]"
            " with dynamic N"
        )
    k = manifest.num_classes
    for o in outputs:
        odims = list(o.dims)
        if len(odims) != 2 or (isinstance(odims[1], int) and odims[1] != k):
            raise ModelInvalidError(f"{model_path}: output '{o.name}' has shape {odims}, expected [N, {k}]")

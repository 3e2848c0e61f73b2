"""Service settings: one pydantic-settings class, environment prefix DSPHERE_.

Every field is documented in docs/API.md. Invalid values fail at start with a
one-line message (see `load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.errors import ValidationErrorDetails, validation_message
from app.history_store import MAX_TTL_S, REDIS_MAX_SLOTS, SLOT_BYTES, table_slots

KNOWN_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class SettingsError(ValueError):
    """Settings could not be loaded; the message is one line naming the variable(s)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSPHERE_", extra="ignore", frozen=True)

    # model store
    model_store: Path = Field(Path("model_store"), description="directory holding <name>/<version>/")
    model_name: str = Field("fashion-mnist-baseline", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    model_version: str = Field("latest", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    rho: float | None = Field(None, gt=0, description="overrides the manifest's calibrated rho")

    # server (used by `python -m app`; the uvicorn CLI has its own --host/--port)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # input limits
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="request body cap of /classify")
    max_batch_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request body cap of batch/v2")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width*height cap, checked before decoding")
    max_batch_files: int = Field(64, ge=1, le=4096, description="files per /classify/batch, N per v2 infer")

    # micro-batching engine
    batch_size: int = Field(32, ge=1, le=4096, description="max rows per inference call")
    batch_delay_ms: float = Field(1.0, ge=0, le=1000, description="max wait to fill a batch")
    queue_size: int = Field(256, ge=1, description="pending requests before 503")
    served_model_file: Path | None = Field(
        None, description="several workers: POST /admin/reload writes the version here and every worker follows "
        "(gunicorn.conf.py sets it); unset: a reload reaches the worker that received it only")
    inline_batch_us: float = Field(
        1000.0, ge=0, description="a request alone (nothing queued, none arriving, the batch thread idle) runs on "
        "the event loop when a batch costs at most this (measured); longer ones, and every real batch, in the "
        "batch thread; 0: always the thread")
    providers: str = Field(
        ",".join(DEFAULT_PROVIDERS),
        description="comma-separated ONNX Runtime execution providers, in order of preference",
    )
    intra_op_threads: int = Field(0, ge=0, description="inference threads, ONNX Runtime or OpenVINO (0: its default)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: OpenVINO's bf16 kernels where the CPU has them and the version's precision "
        "record allows; the fp32 ONNX Runtime reference otherwise (with a warning)")
    backend: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto", description="auto: onnxruntime for fp32, openvino for bf16")

    # the page (GET /): models of the store that POST /explain may load besides the served one
    other_models: int = Field(
        4, ge=0, le=64, description="other models of the store POST /explain may load (latest version each); 0: none"
    )

    # the Open Inference Protocol's gRPC endpoint (app/grpc_server.py): off unless a port is set
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="port of the gRPC server (inference.GRPCInferenceService); unset: off")
    grpc_host: str = Field("127.0.0.1", description="address the gRPC server binds (0.0.0.0: every interface)")

    # admin
    admin_token: str | None = Field(None, description="bearer token of POST /admin/reload; unset: disabled")

    # the query-history detector (app/query_history.py, docs/QUERY_HISTORY.md)
    query_history_action: Literal["reject", "flag", "off"] = Field(
        "reject", description="what an attack query gets: reject (verdict reject, reason query_history), flag "
        "(counted and logged only) or off (no detector)")
    query_history_redis_url: str | None = Field(
        None, description="redis://host:port/db shared by every worker and replica; unset: this process's memory")
    query_history_shared_dir: Path | None = Field(
        None, description="a directory (tmpfs) where every worker of this host maps one history table; unset and "
        "no Redis: each process its own")
    query_history_salt: SecretStr | None = Field(
        None, description="secret key of the fingerprints (>= 16 characters); unset: a random one, shared "
        "through Redis when Redis is the store")
    query_history_ttl_s: float = Field(24 * 3600.0, gt=0, le=MAX_TTL_S, description="how long a query is remembered")
    query_history_table_mb: float = Field(
        32.0, ge=0.01, le=4096, description="the history table's size in MB (10^6 bytes), 8 bytes a slot; it "
        "remembers about 1,990 distinct queries per MB (512: a million; docs/QUERY_HISTORY.md)")
    query_history_threshold: int = Field(
        15, ge=1, le=256, description="fingerprint hashes shared with one recent query that make an attack query")
    query_history_result_cache: int = Field(
        10_000, ge=0, description="exact repeats answered from memory: answers kept (0: none)")

    # quarantine of rejected inputs (opt-in)
    quarantine_dir: Path | None = None
    quarantine_max_bytes: int = Field(100 * 1024 * 1024, ge=1)

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, v: str) -> str:
        names = [p.strip() for p in v.split(",") if p.strip()]
        if not names:
            raise ValueError("must name at least one provider")
        unknown = [p for p in names if p not in KNOWN_PROVIDERS]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; known: {list(KNOWN_PROVIDERS)}")
        return ",".join(names)

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _empty_port(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("admin_token")
    @classmethod
    def _check_token(cls, v: str | None) -> str | None:
        if v is not None and v != "" and len(v) < 16:
            raise ValueError("must be at least 16 characters (or unset to disable the admin endpoint)")
        return v or None

    @field_validator("query_history_salt")
    @classmethod
    def _check_salt(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() != "" and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (or unset for a random one)")
        return v if v is not None and v.get_secret_value() else None

    @field_validator("query_history_redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v or None

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.query_history_redis_url and table_slots(self.query_history_table_mb) > REDIS_MAX_SLOTS:
            raise ValueError(f"DSPHERE_QUERY_HISTORY_TABLE_MB is at most {REDIS_MAX_SLOTS * SLOT_BYTES // 10**6} with "
                             "Redis (a Redis string holds 512 MiB)")
        if self.max_batch_upload_bytes < self.max_upload_bytes:
            raise ValueError("DSPHERE_MAX_BATCH_UPLOAD_BYTES must be >= DSPHERE_MAX_UPLOAD_BYTES")
        if self.backend == "onnxruntime" and self.precision != "fp32":
            raise ValueError(f"DSPHERE_PRECISION={self.precision} runs on OpenVINO: set DSPHERE_BACKEND=openvino "
                             "or auto")
        return self

    @property
    def runtime_backend(self) -> str:
        """The backend asked for, "auto" resolved."""
        if self.backend != "auto":
            return self.backend
        return "onnxruntime" if self.precision == "fp32" else "openvino"

    @property
    def provider_list(self) -> list[str]:
        return self.providers.split(",")

    @property
    def batch_delay_s(self) -> float:
        return self.batch_delay_ms / 1000.0


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and `overrides`), or SettingsError with a one-line message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError("invalid settings: " + validation_message(exc.errors(), _variable)) from None


def _variable(error: ValidationErrorDetails) -> str:
    """The environment variable an error is about, with the value given (never the admin token's)."""
    loc = error.get("loc") or ()
    var = f"DSPHERE_{str(loc[0]).upper()}" if loc else "settings"
    value = error.get("input")
    secret = var == "DSPHERE_ADMIN_TOKEN"
    return var if isinstance(value, dict) or secret else f"{var}={value!r}"

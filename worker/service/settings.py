"""Every setting of the service in one pydantic-settings class (environment prefix ``FPROTOSEG_``).

Lives in the job service because both the API and the workers read it (app -> worker -> model).
It is the one home of the checkpoint, device and precision settings: the CLI reads them here too.
These names (``FPROTOSEG_DATA_DIR``, ``FPROTOSEG_BROKER_URL``, ``FPROTOSEG_API_KEYS``,
``FPROTOSEG_AUTH_DISABLED``, ``FPROTOSEG_MAX_UPLOAD_MB``, ``FPROTOSEG_CHECKPOINT``,
``FPROTOSEG_CALLBACK_SECRET``) are part of the public contract; the rest tune the service and have
safe defaults (docs/service.md, "Settings", lists them all). Importing this module is cheap (no
torch, no Celery).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fprotoseg.model.errors import ConfigurationError
from fprotoseg.worker.wsi.cpus import default_pipeline_threads

__all__ = ["KeyEntry", "Settings", "load_settings", "parse_key_entries", "tenant_of_bare_key"]

# A tenant name is data in job records and part of Redis key names: no ':' and nothing exotic.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class KeyEntry:
    """One accepted API key: its tenant and the sha256 of the key (plaintext is never kept)."""

    tenant: str
    key_sha256: bytes
    admin: bool = False


def tenant_of_bare_key(key_sha256_hex: str) -> str:
    """The tenant of a key given without one: derived from the key's hash, so the plaintext key
    and its ``sha256:`` form name the same tenant and no record ever holds the key itself."""
    return "key-" + key_sha256_hex.lower()[:16]


def _parse_one(entry: str, *, admin: bool) -> KeyEntry:
    """``key`` | ``sha256:<hex>`` | ``tenant:key`` | ``tenant:sha256:<hex>``."""
    tenant: str | None = None
    rest = entry
    head, sep, tail = entry.partition(":")
    if sep and head != "sha256" and TENANT_PATTERN.fullmatch(head):
        tenant, rest = head, tail
    if rest.startswith("sha256:") and _SHA256_HEX.fullmatch(rest[7:]):
        digest_hex = rest[7:].lower()
    elif rest:
        digest_hex = hashlib.sha256(rest.encode()).hexdigest()
    else:
        raise ValueError(f"the entry for tenant {tenant!r} has no key")
    return KeyEntry(tenant or tenant_of_bare_key(digest_hex), bytes.fromhex(digest_hex), admin)


def parse_key_entries(keys: list[str], admin_keys: list[str]) -> list[KeyEntry]:
    """Every accepted key; admin keys see every tenant's jobs (operators, dashboards)."""
    entries = [_parse_one(k, admin=False) for k in keys]
    entries += [_parse_one(k, admin=True) for k in admin_keys]
    return entries


class Settings(BaseSettings):
    """Configuration of the API, the embedded worker and the Celery workers."""

    # env_ignore_empty: `FPROTOSEG_X=` (as docker compose passes an unset variable) means "unset".
    model_config = SettingsConfigDict(
        env_prefix="FPROTOSEG_", extra="ignore", validate_default=True, env_ignore_empty=True
    )

    # --- public contract (the names above) ----------------------------------------------------------
    data_dir: Path = Field(
        default=Path("fprotoseg-data"),
        description="Uploads, job results, the SQLite job store and the generated API key.",
    )
    broker_url: str | None = Field(
        default=None,
        description="redis://host:port/db; unset = embedded default (SQLite store, local worker process).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys accepted in the X-API-Key header: `key` (its own tenant), "
        "`tenant:key`, or either with the key as `sha256:<hex>` so the environment holds no plaintext.",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Keys (plain or sha256:<hex>) that see, download and cancel every tenant's jobs.",
    )
    auth_disabled: bool = Field(default=False, description="true = no key needed. Never the default.")
    max_upload_mb: float = Field(default=8192.0, gt=0, description="Largest accepted upload (413 above).")
    checkpoint: Path | None = Field(
        default=None,
        description="The default model: a name from GET /models or a .safetensors path; unset = packaged "
        "default.",
    )
    slide_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders (comma-separated; read-only mounts) that POST /segment may name slides in "
        "by file:// URI; unset = slides by path are refused.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 API endpoint for s3:// slides when not AWS (MinIO, Ceph, …)."
    )
    slide_cache_max_mb: float = Field(
        default=8192.0, gt=0, description="Largest s3:// slide fetched into the uploads dir (413 above)."
    )
    dicom_zip_max_files: int = Field(
        default=20_000, ge=1, description="Most entries in an uploaded zip of a DICOM WSI series."
    )
    dicom_zip_max_mb: float = Field(
        default=16384.0, gt=0, description="Most MiB an uploaded DICOM zip may inflate to (413 above)."
    )
    models_dir: Path | None = Field(
        default=None,
        description="Folder of further model checkpoints (*.safetensors, named by file stem) beside the "
        "packaged ones; a job picks one with model=NAME.",
    )
    model_cache_size: int = Field(
        default=2, ge=1, le=16, description="Loaded models a worker process keeps (least recently used out)."
    )
    callback_secret: str | None = Field(
        default=None,
        description="HMAC-SHA256 key signing callbacks; unset = generated once into "
        "<data dir>/callback-secret.",
    )
    callback_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Callback hosts (names, IPs or CIDR networks) allowed although not globally routable "
        "(the LIMS on the hospital network).",
    )
    min_free_mb: float = Field(
        default=1024.0,
        ge=0,
        description="/readyz fails and uploads get 507 when the data dir has less free space than this.",
    )
    retention_days: float = Field(
        default=0.0,
        ge=0,
        description="Delete finished jobs (records, uploads, results) this many days after they "
        "ended; 0 = keep.",
    )
    maintenance_interval_s: float = Field(
        default=15.0, gt=0, description="How often the API requeues lost jobs and applies retention."
    )
    job_heartbeat_interval_s: float = Field(
        default=10.0, gt=0, description="How often a running job writes its heartbeat."
    )
    job_heartbeat_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="A running job without a heartbeat for this long is requeued (or failed: worker_lost).",
    )

    # --- HTTP ------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = Field(
        default=None, description="Base URL clients reach the API at; makes links in callbacks absolute."
    )
    view_link_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86400.0,
        description="How long the signed result-viewer link in GET /jobs/{id} (links.view) stays valid.",
    )
    view_link_secret: str | None = Field(
        default=None,
        description="HMAC-SHA256 key signing result-viewer links; unset = generated once into "
        "<data dir>/view-link-secret (every API replica on the shared volume reads the same one).",
    )
    metrics_public: bool = Field(default=True, description="/metrics without a key (Prometheus scrapes).")
    jobs_page_max: int = Field(default=200, ge=1, description="Largest page size of GET /jobs.")

    # --- inference -------------------------------------------------------------------------------
    device: str = Field(default="auto", description="auto | cpu | cuda")
    precision: str = Field(
        default="auto", description="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16"
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Tiles per batch; unset = pipeline default."
    )
    pipeline_threads: int = Field(
        default_factory=default_pipeline_threads,
        ge=1,
        description="Threads reading, decoding and stitching tiles; default one per available core.",
    )
    qc_policy: Literal["warn", "refuse"] = Field(
        default="warn",
        description="Slide QC: warn (the job succeeds with the QC codes as warnings) or refuse (the job "
        "fails with the first QC code before inference); a request's qc_policy overrides it.",
    )

    # --- jobs, Celery and Redis ------------------------------------------------------------------
    queue: str = Field(default="fprotoseg", description="Celery queue the API sends to and workers read.")
    redis_key_prefix: str = Field(
        default="fprotoseg:", description="Prefix of every Redis key (job store and Kombu's own keys)."
    )
    job_soft_time_limit_s: float = Field(default=4 * 3600.0, gt=0, description="Job fails with time_limit.")
    job_hard_time_limit_s: float = Field(default=4 * 3600.0 + 300.0, gt=0, description="Worker child killed.")
    visibility_timeout_s: float = Field(
        default=5 * 3600.0,
        gt=0,
        description="Unacknowledged jobs are redelivered after this; must exceed the hard time limit.",
    )
    unacked_restore_interval_s: float = Field(
        default=30.0, gt=0, description="How often a worker looks for jobs of a lost worker to redeliver."
    )
    worker_concurrency: int = Field(default=1, ge=1, description="Jobs per Celery worker (one GPU: 1).")
    worker_max_tasks_per_child: int = Field(default=50, ge=1, description="Recycle a worker child after N.")
    max_delivery_attempts: int = Field(
        default=3, ge=1, description="A job whose worker died this many times fails (poison slide guard)."
    )
    transient_retries: int = Field(default=3, ge=0, description="Retries of a job after a transient error.")
    progress_interval_s: float = Field(default=0.5, ge=0, description="Least time between progress writes.")
    cancel_poll_interval_s: float = Field(default=1.0, ge=0, description="Least time between cancel checks.")
    embedded_poll_interval_s: float = Field(default=0.5, gt=0, description="Embedded worker queue poll.")
    keep_uploads: bool = Field(
        default=True, description="false = delete a slide's upload once its job has finished (saves disk)."
    )
    embedded_worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Scheduling niceness of the embedded worker (API stays responsive).",
    )
    heartbeat_stale_s: float = Field(default=15.0, gt=0, description="/readyz: worker heartbeat max age.")

    # --- callbacks -------------------------------------------------------------------------------
    callback_timeout_s: float = Field(default=10.0, gt=0)
    callback_attempts: int = Field(default=4, ge=1)
    callback_backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each time.")

    @field_validator("api_keys", "admin_keys", "callback_allowed_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``FPROTOSEG_API_KEYS=a,b`` -> ["a", "b"]; blanks dropped."""
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("slide_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        """``FPROTOSEG_SLIDE_ROOTS=/mnt/a,/mnt/b`` -> two absolute folders."""
        if isinstance(value, str):
            return [Path(p.strip()) for p in value.split(",") if p.strip()]
        return value

    @field_validator("broker_url", "callback_secret", "public_url", "view_link_secret", "s3_endpoint_url",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("checkpoint", "models_dir", mode="before")
    @classmethod
    def _blank_checkpoint_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.broker_url is not None and not self.broker_url.startswith(("redis://", "rediss://")):
            raise ValueError("FPROTOSEG_BROKER_URL must be a redis:// or rediss:// URL (or unset)")
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("FPROTOSEG_JOB_HARD_TIME_LIMIT_S must exceed FPROTOSEG_JOB_SOFT_TIME_LIMIT_S")
        if self.visibility_timeout_s <= self.job_hard_time_limit_s:
            # Redis redelivers a message still unacknowledged after the visibility timeout, even
            # when its worker is alive: a shorter timeout would run long jobs twice.
            raise ValueError(
                "FPROTOSEG_VISIBILITY_TIMEOUT_S must exceed FPROTOSEG_JOB_HARD_TIME_LIMIT_S "
                "(else long jobs are delivered twice)"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("FPROTOSEG_DEVICE must be auto, cpu or cuda")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError("FPROTOSEG_PRECISION must be auto, fp32, fp16 or bf16")
        parse_key_entries(self.api_keys, self.admin_keys)  # a malformed entry fails at start-up
        if self.job_heartbeat_timeout_s <= 2 * self.job_heartbeat_interval_s:
            raise ValueError(
                "FPROTOSEG_JOB_HEARTBEAT_TIMEOUT_S must exceed twice FPROTOSEG_JOB_HEARTBEAT_INTERVAL_S"
            )
        return self

    def key_entries(self) -> list[KeyEntry]:
        """FPROTOSEG_API_KEYS and FPROTOSEG_ADMIN_KEYS as hashed entries with their tenants."""
        return parse_key_entries(self.api_keys, self.admin_keys)

    # --- derived paths ---------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """No broker configured: SQLite job store and a local worker process."""
        return self.broker_url is None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api-key"

    @property
    def callback_secret_file(self) -> Path:
        """Where the generated per-install callback secret lives (shared volume: API and workers)."""
        return self.data_dir / "callback-secret"

    @property
    def view_link_secret_file(self) -> Path:
        """Where the generated per-install secret signing result-viewer links lives."""
        return self.data_dir / "view-link-secret"

    def owned_upload(self, stored_path: str) -> Path | None:
        """The job's slide if it is the service's own copy (in the uploads dir), else None: a slide
        referenced by path (FPROTOSEG_SLIDE_ROOTS) belongs to the lab and is never deleted."""
        if not stored_path:
            return None
        path = self.upload_file(stored_path)
        try:
            path.resolve().relative_to(self.uploads_dir.resolve())
        except ValueError:
            return None
        return path

    def upload_file(self, stored_path: str) -> Path:
        """A job's slide; records hold paths relative to the data dir (a shared volume)."""
        path = Path(stored_path)
        return path if path.is_absolute() else self.data_dir / path

    def result_dir(self, job_id: str) -> Path:
        """Where the finished result files of a job live (complete or absent, never partial)."""
        return self.jobs_dir / job_id / "results"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value becomes one ConfigurationError line, not a traceback."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        name = f"FPROTOSEG_{where.upper()}: " if where else ""
        raise ConfigurationError(f"invalid setting {name}{first.get('msg', exc)}") from None

"""Runtime settings (SPEC §4): environment variables with the `EDGE_` prefix.

Every value has a default that works on one machine. A value outside its range
raises `SettingsError`, whose message names the variable; the CLI turns it into
exit code 2 before anything starts.
"""

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_MQTT_URL = "mqtt://127.0.0.1:1883"


class SettingsError(ValueError):
    """A setting is missing or out of range; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="ignore", frozen=True)

    # Services. Unset means "local default"; `farmiq-edge up` starts embedded
    # ones instead (it checks `model_fields_set`).
    database_url: str = LOCAL_DATABASE_URL
    mqtt_url: str = LOCAL_MQTT_URL
    media_root: str = "/data/media"
    cloud_url: str = "http://127.0.0.1:8080"
    cloud_token: str = Field(default="", repr=False)
    edge_id: str = Field(default="edge-01", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

    # Retention windows (edge-persistence.md, "Retention and cleanup jobs").
    retention_raw_days: int = Field(default=30, ge=30, le=90)
    retention_agg_days: int = Field(default=365, ge=180, le=365)
    retention_media_days: int = Field(default=30, ge=30, le=90)
    retention_outbox_days: int = Field(default=14, ge=7, le=30)
    dedupe_ttl_hours: int = Field(default=72, ge=24, le=72)

    sync_telemetry: Literal["agg", "raw", "both"] = "agg"

    # Retention and maintenance (actors/retention.py, `farmiq-edge retention`).
    # Sync gate: raw telemetry the cloud may not have yet is kept past its window.
    retention_require_sync: bool = True
    # Media of sessions that are not finalized expire only when this is true.
    retention_media_include_open: bool = False
    # Queue store: done messages (left by the old broker) and rejected ones.
    retention_queue_done_minutes: int = Field(default=5, ge=1, le=1440)
    retention_queue_rejected_days: int = Field(default=30, ge=1, le=365)
    # Temporary/staging media files older than this are debris of a crashed write.
    retention_temp_file_hours: int = Field(default=6, ge=1, le=168)

    # Ingress validation (SPEC §1).
    # An ISO 8601 duration, e.g. PT24H.
    max_clock_skew: timedelta = Field(default=timedelta(hours=24), gt=timedelta(0), le=timedelta(days=7))
    media_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0, le=64 * 1024 * 1024)
    # Telemetry and session payloads (media: base64 of media_max_bytes + 64 KiB).
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)

    # Bridge: MQTT session and micro-batching.
    mqtt_client_id: str = Field(default="farmiq-edge-bridge", min_length=1, max_length=64)
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    mqtt_shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mqtt_session_expiry_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    mqtt_receive_maximum: int = Field(default=10_000, ge=1, le=65_535)
    batch_max_messages: int = Field(default=500, ge=1, le=10_000)
    batch_max_ms: int = Field(default=50, ge=1, le=10_000)
    batch_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    # Touched every second by a live bridge; `farmiq-edge health --heartbeat` reads it.
    bridge_heartbeat_path: str = "/tmp/farmiq-bridge.heartbeat"

    # Workers.
    worker_threads: int = Field(default=4, ge=1, le=64)
    worker_shutdown_seconds: int = Field(default=30, ge=1, le=600)
    metrics_port: int = Field(default=9191, ge=0, le=65_535)

    # --- Bridge robustness and broker security (issue 7 item 7, issue 12) ---
    # Bytes of received, not yet acknowledged payloads the bridge holds in memory.
    # Above it, paho's network thread stops reading the socket (TCP backpressure
    # plus the MQTT receive window bound the rest). Peak RSS is about
    # baseline (~70 MiB) + this + 4 x the largest payload (~14 MB for a 10 MiB frame).
    bridge_inbox_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024, le=1024 ** 3)
    # MQTT keepalive (s): also the bound on how stale the liveness heartbeat's
    # view of the network thread may be (see workers/bridge.py).
    mqtt_keepalive_seconds: int = Field(default=30, ge=5, le=600)
    # CA bundle for mqtts:// (empty: the system trust store).
    mqtt_ca_file: str = ""

    # Outbox forwarder (SPEC §3, actors/outbox.py).
    outbox_batch_max_events: int = Field(default=1000, ge=1, le=1000)
    outbox_batch_max_bytes: int = Field(default=1024 * 1024, ge=4 * 1024, le=1024 * 1024)
    # Longest pause after repeated failures (exponential backoff with jitter).
    outbox_backoff_max_seconds: float = Field(default=300.0, ge=1.0, le=3600.0)
    # Read timeout of one POST (connect: at most 5 s).
    outbox_http_timeout_seconds: float = Field(default=30.0, ge=1.0, le=300.0)
    # Events left claimed by a forwarder that died return to pending after this.
    # Must outlast a live forwarder's claim → POST → record (2 × timeout + 10 s).
    outbox_visibility_seconds: float = Field(default=120.0, ge=5.0, le=3600.0)
    # Batches in flight at once per forwarder process (4: 20k events/s on 2 cores, 2: 16.6k).
    # Each needs a worker thread (EDGE_WORKER_THREADS).
    outbox_concurrency: int = Field(default=4, ge=1, le=16)

    @field_validator("outbox_visibility_seconds")
    @classmethod
    def _visibility_outlasts_a_post(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("outbox_http_timeout_seconds")
        if timeout is not None and value < 2 * timeout + 10:
            raise ValueError(f"must be at least 2 × EDGE_OUTBOX_HTTP_TIMEOUT_SECONDS + 10 "
                             f"({2 * timeout + 10:g})")
        return value

    # Media and inference (issue 8): the media volume, the weight model.
    # Below this many free bytes on the media volume the bridge spools no frame
    # (it holds the message un-acked and retries); 0 turns the floor off.
    media_min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    # A staging file this old that no unfinished queue message names is swept.
    media_staging_max_age_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Another ONNX model with the contract in the README; empty: the baseline shipped in models/weights/.
    model_path: str = ""

    @field_validator("model_path")
    @classmethod
    def _model_file(cls, value: str) -> str:
        if value and not (value.endswith(".onnx") and Path(value).is_file()):
            raise ValueError("must name an existing .onnx file (empty: the shipped baseline)")
        return value

    # onnxruntime intra-op threads per process. 1 on the 2-core box: the
    # baseline model is memory-bound (2 threads gained nothing measurable) and
    # the other core stays free for the bridge, PostgreSQL and the other pools.
    inference_threads: int = Field(default=1, ge=1, le=64)
    inference_batch: int = Field(default=8, ge=1, le=256)


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise SettingsError naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"EDGE_{field.upper()}: {error['msg']} (got {error.get('input')!r})")
        raise SettingsError("invalid setting: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()

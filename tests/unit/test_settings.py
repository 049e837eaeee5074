import pytest

from models.settings import SettingsError, load_settings


def test_defaults_work_on_one_machine(monkeypatch):
    for name in ("EDGE_DATABASE_URL", "EDGE_MQTT_URL", "EDGE_SYNC_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.database_url.startswith("postgresql://") and s.mqtt_url.startswith("mqtt://")
    assert s.sync_telemetry == "agg" and s.dedupe_ttl_hours == 72 and s.media_root == "/data/media"


@pytest.mark.parametrize("name, value", [
    ("EDGE_RETENTION_RAW_DAYS", "5"), ("EDGE_RETENTION_RAW_DAYS", "91"),
    ("EDGE_RETENTION_AGG_DAYS", "179"), ("EDGE_RETENTION_MEDIA_DAYS", "100"),
    ("EDGE_RETENTION_OUTBOX_DAYS", "6"), ("EDGE_DEDUPE_TTL_HOURS", "12"),
    ("EDGE_SYNC_TELEMETRY", "everything"), ("EDGE_EDGE_ID", "bad id"),
    ("EDGE_MQTT_PROTOCOL", "4"), ("EDGE_BATCH_MAX_MESSAGES", "0"),
    ("EDGE_OUTBOX_BATCH_MAX_EVENTS", "1001"), ("EDGE_OUTBOX_BATCH_MAX_BYTES", "2000000"),
    ("EDGE_OUTBOX_BACKOFF_MAX_SECONDS", "0"), ("EDGE_OUTBOX_CONCURRENCY", "0"),
    ("EDGE_OUTBOX_VISIBILITY_SECONDS", "60"),  # less than 2 × the 30 s HTTP timeout + 10
    ("EDGE_MEDIA_MIN_FREE_BYTES", "-1"), ("EDGE_MEDIA_STAGING_MAX_AGE_SECONDS", "5"),
    ("EDGE_MODEL_PATH", "/nonexistent/model.onnx"), ("EDGE_INFERENCE_THREADS", "0"),
    ("EDGE_INFERENCE_BATCH", "1000"),
])
def test_out_of_range_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_clock_skew_is_a_duration(monkeypatch):
    monkeypatch.setenv("EDGE_MAX_CLOCK_SKEW", "PT2H")
    assert load_settings().max_clock_skew.total_seconds() == 7200
    monkeypatch.setenv("EDGE_MAX_CLOCK_SKEW", "PT800H")
    with pytest.raises(SettingsError, match="EDGE_MAX_CLOCK_SKEW"):
        load_settings()


def test_in_range_values_are_taken(monkeypatch):
    monkeypatch.setenv("EDGE_RETENTION_RAW_DAYS", "90")
    monkeypatch.setenv("EDGE_SYNC_TELEMETRY", "both")
    s = load_settings()
    assert (s.retention_raw_days, s.sync_telemetry) == (90, "both")


@pytest.mark.parametrize("name, value", [
    ("EDGE_RETENTION_QUEUE_DONE_MINUTES", "0"), ("EDGE_RETENTION_QUEUE_REJECTED_DAYS", "400"),
    ("EDGE_RETENTION_TEMP_FILE_HOURS", "0"), ("EDGE_RETENTION_REQUIRE_SYNC", "perhaps"),
    ("EDGE_RETENTION_MEDIA_INCLUDE_OPEN", "sometimes"),
])
def test_bad_maintenance_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()

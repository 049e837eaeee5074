"""The broker-side loss window (issue 12 item 5), measured on private Mosquitto brokers.

The bridge is down (its persistent session exists and is on disk), devices
publish QoS 1 and get every PUBACK, then the broker is killed (-9) and
restarted: what survives is what its last snapshot held. With
deploy/mosquitto/mosquitto.conf (a snapshot every 1,000 changes) at most
~1,000 PUBACKed messages are lost; with the old `autosave_interval 30` every
message since the last periodic snapshot is.
"""

from pathlib import Path

from tests.support.publisher import publish_all
from tests.support.services import MOSQUITTO_CONFIG
from workers.bench.mqtt import create_session, drain_session
from workers.dev.embedded import start_mosquitto

TOPIC = "farmiq/v1/t/f/b/d/telemetry"
WINDOW_MESSAGES = 1000


def survivors_after_kill(data_dir: Path, settings: dict[str, str | None], n: int) -> set[int]:
    broker = start_mosquitto(MOSQUITTO_CONFIG, data_dir, settings=settings)
    try:
        create_session(broker.url)
        broker.restart()  # SIGTERM saves: the session is on disk, as in a running system
        publish_all(broker.url, [(TOPIC, b'{"seq":%d}' % i) for i in range(n)])  # all PUBACKed
        broker.kill()
        broker.start()
        return drain_session(broker.url, quiet=2.0)
    finally:
        broker.stop()


def test_deploy_config_loses_at_most_the_snapshot_window(tmp_path):
    n = 5321  # not a multiple of the snapshot period
    survived = survivors_after_kill(tmp_path / "chosen", {}, n)
    lost = n - len(survived)
    print(f"deploy config: {n} PUBACKed, kill -9, {len(survived)} survived, {lost} lost")
    assert lost <= WINDOW_MESSAGES
    assert survived == set(range(len(survived)))  # the oldest survive; the window is the newest


def test_old_periodic_snapshot_loses_everything_since_the_last_one(tmp_path):
    n = 2000
    survived = survivors_after_kill(tmp_path / "old", {"autosave_on_changes": "false",
                                                       "autosave_interval": "30"}, n)
    print(f"autosave_interval 30: {n} PUBACKed, kill -9, {len(survived)} survived")
    assert len(survived) == 0  # published within 30 s of the last snapshot: all lost

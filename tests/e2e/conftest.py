"""End-to-end fixtures: a private Mosquitto (project config), a private PostgreSQL, farmiq-edge processes."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import edge_env, wait_until
from workers.dev.processes import EdgeProcess, edge_command
from schema.migrate import migrate
from tests.support.services import burst_mqtt
from workers.dev.embedded import start_postgres


@pytest.fixture
def mqtt_broker() -> Iterator:
    broker = burst_mqtt()
    yield broker
    broker.stop()


class Pipeline:
    """The bridge and an ingest worker, started and crashed as an operator would see them."""

    def __init__(self, db_url: str, mqtt_url: str, tmp: Path, **env: str) -> None:
        self.env = edge_env(db_url, mqtt_url, tmp, **env)
        self.tmp = tmp
        self.processes: list[EdgeProcess] = []

    def start(self, name: str, args: list[str], **extra_env: str) -> EdgeProcess:
        proc = EdgeProcess(name, edge_command(*args), {**self.env, **extra_env}, self.tmp / f"{name}.log").start()
        self.processes.append(proc)
        return proc

    def bridge(self, name: str = "bridge", **extra_env: str) -> EdgeProcess:
        heartbeat = self.tmp / f"{name}.heartbeat"
        heartbeat.unlink(missing_ok=True)
        proc = self.start(name, ["bridge"], EDGE_BRIDGE_HEARTBEAT_PATH=str(heartbeat), **extra_env)
        # Connected and subscribed: the persistent session now queues for us.
        wait_until(lambda: "event=mqtt_subscribed" in proc.log() and heartbeat.exists(), 20,
                   "the bridge to connect")
        return proc

    def worker(self, queue: str = "ingest", **extra_env: str) -> EdgeProcess:
        return self.start(f"worker-{queue}", ["worker", "--queues", queue], **extra_env)

    def stop_all(self) -> None:
        for proc in self.processes:
            proc.stop()


@pytest.fixture
def pipeline(db_url, mqtt_broker, tmp_path) -> Iterator:
    def make(**env: str) -> Pipeline:
        made = Pipeline(db_url, mqtt_broker.url, tmp_path, **env)
        pipelines.append(made)
        return made
    pipelines: list[Pipeline] = []
    yield make
    for p in pipelines:
        p.stop_all()


@pytest.fixture
def private_pg():
    # Under /tmp itself: as root, pgserver runs PostgreSQL as another user,
    # which cannot enter pytest's private tmp_path.
    data_dir = Path(tempfile.mkdtemp(prefix="farmiq-test-outage-")) / "pgdata"
    service = start_postgres(data_dir)
    migrate(service.url)
    holder = {"service": service, "restart": lambda: start_postgres(data_dir)}
    yield holder
    holder["service"].stop()
    shutil.rmtree(data_dir.parent, ignore_errors=True)

"""`farmiq-edge up`: the whole system on one machine.

Runs the Procfile's processes (plus the device simulator) under honcho. With
no EDGE_DATABASE_URL / EDGE_MQTT_URL configured it first starts an embedded
PostgreSQL (pgserver) and MQTT broker (amqtt, MQTT 3.1.1 only, so the bridge
speaks 3.1.1 to it), keeping their data under --state-dir. With no
EDGE_CLOUD_URL, the outbox forwards to the reference cloud sink
(`farmiq-edge cloud-sink`, its SQLite file under --state-dir). Ctrl-C or SIGTERM
stops every child, then the embedded services.
"""

import logging
import os
import shlex
import sys
from pathlib import Path

from honcho.manager import Manager

from models.settings import Settings

log = logging.getLogger("farmiq_edge.up")
PROCFILE = Path(__file__).resolve().parents[1] / "Procfile"


def procfile_commands(procfile: Path = PROCFILE) -> dict[str, list[str]]:
    """Procfile lines as argv lists; `farmiq-edge` runs with this interpreter."""
    commands = {}
    for line in procfile.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            argv = shlex.split(command)
            if argv[0] == "farmiq-edge":
                argv = [sys.executable, "-m", "workers.cli", *argv[1:]]
            commands[name.strip()] = argv
    return commands


def run_up(settings: Settings, *, state_dir: Path, simulate: bool) -> int:
    from schema.migrate import migrate
    from workers.embedded import start_mqtt, start_postgres

    env = dict(os.environ)
    services = []
    try:
        if "database_url" not in settings.model_fields_set:
            pg = start_postgres(state_dir / "pgdata")
            services.append(pg)
            env["EDGE_DATABASE_URL"] = pg.url
            log.info("event=embedded_postgres url=%s", pg.url)
        if "mqtt_url" not in settings.model_fields_set:
            mqtt = start_mqtt()
            services.append(mqtt)
            env["EDGE_MQTT_URL"] = mqtt.url
            env["EDGE_MQTT_PROTOCOL"] = "3.1.1"
            log.info("event=embedded_mqtt url=%s", mqtt.url)
        if "media_root" not in settings.model_fields_set:
            env["EDGE_MEDIA_ROOT"] = str((state_dir / "media").resolve())
        migrate(env.get("EDGE_DATABASE_URL", settings.database_url))

        manager = Manager()
        commands = procfile_commands()
        if "cloud_url" not in settings.model_fields_set:
            from workers.embedded import free_port
            port = free_port()
            env["EDGE_CLOUD_URL"] = f"http://127.0.0.1:{port}"
            commands = {"cloud-sink": [sys.executable, "-m", "workers.cli", "cloud-sink", "--port", str(port),
                                       "--db", str((state_dir / "cloud-sink.sqlite3").resolve())],
                        **commands}
            log.info("event=reference_cloud_sink url=%s", env["EDGE_CLOUD_URL"])
        if simulate:
            commands["simulate"] = [sys.executable, "-m", "workers.cli", "simulate"]
        for offset, (name, argv) in enumerate(commands.items()):
            # One metrics port per process (9191, 9192, …); 0 keeps them all off.
            port = settings.metrics_port + offset if settings.metrics_port else 0
            manager.add_process(name, shlex.join(argv), env={**env, "EDGE_METRICS_PORT": str(port)})
        manager.loop()  # returns when any child exits or on Ctrl-C/SIGTERM; stops the rest
        # honcho reports a requested stop as 130/143 (shell style); for us it is success.
        return 0 if manager.returncode in (None, 130, 143) else 1
    finally:
        for service in reversed(services):
            service.stop()

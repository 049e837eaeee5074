"""`farmiq-edge up`: the whole system on one machine.

Runs the Procfile's processes (plus the device simulator) under honcho. With
no EDGE_DATABASE_URL / EDGE_MQTT_URL configured it first starts an embedded
PostgreSQL (pgserver) and MQTT broker (amqtt, MQTT 3.1.1 only, so the bridge
speaks 3.1.1 to it), keeping their data under --state-dir. With no
EDGE_CLOUD_URL, the outbox forwards to the reference cloud sink
(`farmiq-edge cloud-sink`, its SQLite file under --state-dir). Ctrl-C or SIGTERM
stops every child, then the embedded services.

The terminal shows the live status view (workers/status.py), not log lines:
each process's output goes to <state-dir>/logs/<process>.log, the embedded
services' and migrations' own logging to logs/up.log; `--logs` also prints
process output on the terminal.
"""

import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from honcho.manager import Manager
from honcho.printer import Printer

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


def run_up(settings: Settings, *, state_dir: Path, simulate: bool, show_logs: bool = False,
           interval: float = 2.0) -> int:
    from rich.console import Console

    from schema.migrate import migrate
    from workers.embedded import start_mqtt, start_postgres
    from workers.process_logs import ProcessLogs
    from workers.status import LiveView

    logs = ProcessLogs(state_dir / "logs")
    restore_logging = _log_to_file(logs.path("up"), terminal=show_logs)
    env = dict(os.environ)
    services = []
    view = None
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

        manager = Manager(printer=logs)
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
        database_url = env.get("EDGE_DATABASE_URL", settings.database_url)
        view = LiveView(database_url, env.get("EDGE_MEDIA_ROOT", settings.media_root), interval=interval,
                        title=f"farmiq-edge up · logs in {logs.logs_dir}/ · Ctrl-C stops everything",
                        console=Console()).start()
        if show_logs:  # created after the view started: its lines print above the view
            logs.echo = Printer(sys.stdout)
        manager.loop()  # returns when any child exits or on Ctrl-C/SIGTERM; stops the rest
        # honcho reports a requested stop as 130/143 (shell style); for us it is success.
        return 0 if manager.returncode in (None, 130, 143) else 1
    finally:
        if view is not None:
            view.stop()
        for service in reversed(services):
            service.stop()
        logs.close()
        restore_logging()


def _log_to_file(path: Path, *, terminal: bool) -> Callable[[], None]:
    """Send this process's logging to `path`; on the terminal keep only `up`'s own
    lines (the embedded database URL), unless `terminal`. Returns an undo."""
    root = logging.getLogger()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(root.handlers[0].formatter if root.handlers else None)
    only_up = logging.Filter(log.name)
    kept = [h for h in root.handlers]
    if not terminal:
        for handler in kept:
            handler.addFilter(only_up)
    root.addHandler(to_file)

    def undo() -> None:
        root.removeHandler(to_file)
        to_file.close()
        for handler in kept:
            handler.removeFilter(only_up)
    return undo

"""`farmiq-edge`: the one operator command (SPEC §5).

Exit codes: 0 ok, 1 failure, 2 usage error (including a bad setting), 3 cannot
connect. Subcommands only translate arguments into calls; the work lives in the
modules they import (imported late, so `--help` and bad settings never need a
database).
"""

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import psycopg2
import sqlalchemy.exc

from models.settings import Settings, SettingsError, load_settings

from workers.exit_codes import EXIT_CANNOT_CONNECT, EXIT_FAILURE, EXIT_OK, EXIT_USAGE  # noqa: F401
QUEUES = ("ingest", "aggregate", "media", "inference", "outbox", "maintenance")
# Actor modules by queue: `farmiq-edge worker --queues X` imports only these.
ACTOR_MODULES = {"ingest": "actors.ingest", "aggregate": "actors.aggregate", "media": "actors.media",
                 "inference": "actors.inference", "outbox": "actors.outbox", "maintenance": "actors.retention"}

log = logging.getLogger("farmiq_edge")


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from schema.migrate import migrate
    applied = migrate(settings.database_url)
    print(f"migrations applied: {len(applied)}" + (f" ({', '.join(applied)})" if applied else ""))
    return EXIT_OK


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    queues = args.queues or list(QUEUES)
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        print(f"farmiq-edge worker: unknown queue(s): {', '.join(unknown)}", file=sys.stderr)
        return EXIT_USAGE
    # dramatiq's Prometheus middleware reads these at import, in every process.
    os.environ.setdefault("dramatiq_prom_port", str(settings.metrics_port))
    os.environ.setdefault("dramatiq_prom_db", tempfile.mkdtemp(prefix="farmiq-prom-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["dramatiq_prom_db"]
    argv = [sys.executable, "-m", "dramatiq", *sorted({ACTOR_MODULES[q] for q in queues}),
            "--queues", *queues,
            "--processes", str(args.processes), "--threads", str(settings.worker_threads),
            "--worker-shutdown-timeout", str(settings.worker_shutdown_seconds * 1000)]
    os.execv(sys.executable, argv)  # dramatiq owns signals and child processes from here


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Kubernetes exec probe: database reachable and schema current."""
    import time

    from schema.migrate import pending_migrations
    if args.heartbeat:
        try:
            age = time.time() - os.stat(args.heartbeat).st_mtime
        except FileNotFoundError:
            print(f"unhealthy: no heartbeat file {args.heartbeat}", file=sys.stderr)
            return EXIT_FAILURE
        if age > args.max_age:
            print(f"unhealthy: heartbeat {args.heartbeat} is {age:.0f}s old", file=sys.stderr)
            return EXIT_FAILURE
    pending = pending_migrations(settings.database_url)
    if pending:
        print(f"unhealthy: migrations pending: {', '.join(pending)}", file=sys.stderr)
        return EXIT_FAILURE
    print("ok")
    return EXIT_OK


def cmd_bridge(settings: Settings, args: argparse.Namespace) -> int:
    from workers.bridge import run_bridge
    return run_bridge(settings)


def cmd_scheduler(settings: Settings, args: argparse.Namespace) -> int:
    from workers.scheduler import run_scheduler
    return run_scheduler(settings)


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from workers.dev.simulate import run_simulator
    return run_simulator(settings, devices=args.devices, interval=args.interval)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.up import run_up
    return run_up(settings, state_dir=Path(args.state_dir), simulate=not args.no_simulate,
                  show_logs=args.logs, interval=args.interval)


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "ingress":
        from workers import dlq_ingress
        return dlq_ingress.run(settings, args)
    from workers import operator
    return operator.dlq(settings, args)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from workers.status import run_status
    return run_status(settings.database_url, settings.media_root, watch=args.watch, interval=args.interval)


def cmd_capacity(settings: Settings, args: argparse.Namespace) -> int:
    from workers.capacity import run_capacity
    return run_capacity(settings, args)


def cmd_outbox(settings: Settings, args: argparse.Namespace) -> int:
    from workers import operator
    return operator.outbox(settings, args)


def cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    from workers.retention import retention
    return retention(settings, args)


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from workers.bench import run_bench
    return run_bench(settings, args)


def cmd_cloud_sink(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.dev.cloud_sink import Faults, run_sink
    if not 0 <= args.fail_rate <= 1:
        print("farmiq-edge cloud-sink: --fail-rate must be within 0..1", file=sys.stderr)
        return EXIT_USAGE
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    faults = Faults(fail_rate=args.fail_rate, status=args.status, latency_ms=args.latency_ms,
                    retry_after=args.retry_after if args.retry_after >= 0 else None,
                    reject_types=list(args.reject_type))
    token = settings.cloud_token if args.token is None else args.token
    return run_sink(db_path=Path(args.db), host=args.host, port=args.port, admin_port=args.admin_port,
                    token=token, faults=faults, outage_seconds=args.outage_seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farmiq-edge", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    command("migrate", cmd_migrate, "apply database migrations (and the dramatiq-pg queue schema)")

    p = command("worker", cmd_worker, "run actors for the given queues (a dramatiq worker)")
    p.add_argument("--queues", nargs="+", choices=QUEUES, metavar="QUEUE",
                   help=f"queues to consume (default: all: {' '.join(QUEUES)})")
    p.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")

    command("bridge", cmd_bridge, "MQTT bridge: validate, micro-batch, enqueue, ack after commit")
    command("scheduler", cmd_scheduler, "send the periodic queue messages (aggregation, maintenance)")

    p = command("simulate", cmd_simulate, "publish demo telemetry and sessions from pretend devices")
    p.add_argument("--devices", type=int, default=5, help="telemetry devices (default 5)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between rounds (default 2)")

    p = command("up", cmd_up, "run everything on this machine (embedded PostgreSQL and MQTT "
                              "when EDGE_DATABASE_URL / EDGE_MQTT_URL are unset)")
    p.add_argument("--state-dir", default=".farmiq", help="embedded data and media (default .farmiq)")
    p.add_argument("--no-simulate", action="store_true", help="do not start the device simulator")
    p.add_argument("--logs", action="store_true",
                   help="also print process logs on the terminal (always in <state-dir>/logs/)")
    p.add_argument("--interval", type=float, default=2.0, help="live view refresh in seconds (default 2)")

    p = command("status", cmd_status, "one screen of queues, ingress, aggregation, sync, media and "
                                      "retention, read from the database (no Prometheus needed)")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="--watch refresh in seconds (default 2)")

    p = command("capacity", cmd_capacity, "database and media volume sizes for an offline window "
                                          "plus the retention windows")
    from workers.capacity import add_arguments as add_capacity_arguments
    add_capacity_arguments(p)

    p = command("cloud-sink", cmd_cloud_sink, "a reference cloud receiver (SPEC §3) with faults on "
                                              "demand, for tests, `up` and staging")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    p.add_argument("--admin-port", type=int, help="admin port: stats, faults, down/up at runtime")
    p.add_argument("--db", default=".farmiq/cloud-sink.sqlite3", help="SQLite file of what it received")
    p.add_argument("--token", help="bearer token to require (default EDGE_CLOUD_TOKEN; empty: none)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of batches answered --status")
    p.add_argument("--status", type=int, default=503, help="status of injected failures (default 503)")
    p.add_argument("--retry-after", type=float, default=1.0,
                   help="Retry-After seconds on injected 429/503 (default 1; negative: none)")
    p.add_argument("--latency-ms", type=int, default=0, help="delay before each batch answer")
    p.add_argument("--reject-type", action="append", default=[], metavar="EVENT_TYPE",
                   help="answer events of this type as rejected (repeatable)")
    p.add_argument("--outage-seconds", type=float, default=0.0,
                   help="the link is down for this long after start")

    p = command("health", cmd_health, "exit 0 when the database answers and the schema is current")
    p.add_argument("--heartbeat", help="also require this file to be recently touched; the bridge "
                   "touches EDGE_BRIDGE_HEARTBEAT_PATH every second only while its main loop runs AND "
                   "paho's network thread is alive, connected and has read from the broker (or is "
                   "held by inbox backpressure) within 2 keepalives")
    p.add_argument("--max-age", type=float, default=30, help="heartbeat age limit in seconds")

    p = command("dlq", cmd_dlq, "inspect, re-drive or purge rejected queue messages")
    dlq = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "list rejected messages"), ("show", "show one rejected message"),
                         ("redrive", "put rejected messages back on their queue"),
                         ("purge", "delete rejected messages")):
        a = dlq.add_parser(action, help=text, description=text)
        if action in ("show",):
            a.add_argument("message_id")
        if action in ("redrive", "purge"):
            a.add_argument("message_ids", nargs="*", help="message ids (default: needs --all)")
            a.add_argument("--all", action="store_true", help="every rejected message")
        if action in ("list", "redrive", "purge"):
            a.add_argument("--queue", help="only this queue")
    from workers.dlq_ingress import add_arguments as add_dlq_ingress_arguments
    add_dlq_ingress_arguments(dlq.add_parser(
        "ingress", help="MQTT messages rejected at ingress: list, show, re-drive, purge",
        description="MQTT messages rejected at ingress (ingress_dead_letters): list, show, "
                    "re-drive with today's rules, purge"))

    p = command("outbox", cmd_outbox, "cloud sync outbox: status, re-drive failed events")
    outbox = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    outbox.add_parser("status", help="counts by status, oldest pending, sync state per tenant",
                      description="counts by status, oldest pending, sync state per tenant")
    a = outbox.add_parser("redrive", help="set failed events back to pending",
                          description="set failed events back to pending")
    a.add_argument("event_ids", nargs="*", help="event ids (default: needs --all)")
    a.add_argument("--all", action="store_true", help="every failed event")

    p = command("retention", cmd_retention, "maintenance jobs by hand: run (or --dry-run), status")
    retention = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = retention.add_parser("run", help="run maintenance jobs now, print what each deleted",
                             description="run maintenance jobs now, print what each deleted")
    a.add_argument("--job", choices=("partitions", "media", "outbox", "dedupe", "queue"),
                   help="only this job (default: all)")
    a.add_argument("--dry-run", action="store_true", help="print what would be deleted, change nothing")
    retention.add_parser("status", help="rows, oldest row, bytes per table; what the sync gate holds back",
                         description="rows, oldest row, bytes per table; what the sync gate holds back")

    p = command("bench", cmd_bench, "benchmarks that print figures (see `farmiq-edge bench ingest --help`)")
    bench = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = bench.add_parser("ingest", help="MQTT → PostgreSQL ingest throughput, latency, memory",
                         description="MQTT → PostgreSQL ingest throughput, latency, memory; "
                                     "with the naive pipeline and bare MQTT as references")
    a.add_argument("--messages", type=int, default=50_000, help="telemetry messages (default 50,000)")
    a.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    a.add_argument("--duplicates", type=float, default=0.05, help="share published twice (default 0.05)")
    a.add_argument("--rate", type=int, default=0, help="offered msg/s (default 0: as fast as possible)")
    a.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    a.add_argument("--skip-references", action="store_true", help="skip the naive and bare-MQTT runs")
    a.add_argument("--c-publishers", type=int, default=8,
                   help="mosquitto_pub processes of the bare C MQTT reference (default 8)")
    a.add_argument("--profile", action="store_true",
                   help="py-spy the bridge and ingest worker processes mid-drain; print their top frames "
                        "(needs the bench extra: pip install -e '.[bench]')")
    a = bench.add_parser("outbox", help="outbox backlog drained to the reference cloud sink; catch-up delay",
                         description="a backlog of pending outbox events drained to the reference cloud "
                                     "sink (events/s, time to empty, forwarder RSS), then the delay from "
                                     "the sink's return after an outage to the first ack")
    a.add_argument("--events", type=int, default=1_000_000, help="backlog (default 1,000,000)")
    a.add_argument("--devices", type=int, default=200, help="devices (default 200)")
    a.add_argument("--catch-up-events", type=int, default=10_000, help="events during the outage (default 10,000)")
    a.add_argument("--outage-seconds", type=float, default=20.0, help="outage length (default 20)")
    a = bench.add_parser("inference", help="weight model frames/s and p50/p99 at 640x480, and end to end",
                         description="weight model frames/s and p50/p99 at 640x480 JPEG: model only, "
                                     "and end to end (publish → inference_results row) with the "
                                     "queue-table bytes added per frame")
    a.add_argument("--frames", type=int, default=300, help="frames published end to end (default 300)")
    a.add_argument("--rate", type=float, default=20.0, help="offered frames/s (default 20; 0: unpaced)")
    a.add_argument("--seconds", type=float, default=5.0, help="model-only run time (default 5)")
    a.add_argument("--model-only", action="store_true", help="skip the end-to-end run")
    a = bench.add_parser("queue", help="queue store: drain a no-op backlog, ours vs stock dramatiq-pg",
                         description="drain a backlog of no-op messages with real dramatiq worker processes, "
                                     "ours and then stock dramatiq-pg; rate, pg_locks, worker RSS")
    a.add_argument("--messages", type=int, default=100_000, help="backlog for ours (default 100,000)")
    a.add_argument("--stock-messages", type=int, default=3_000,
                   help="backlog for stock dramatiq-pg, 0 to skip (default 3,000: it holds a lock per message)")
    a.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    a.add_argument("--threads", type=int, default=8, help="threads per worker process (default 8)")
    a.add_argument("--timeout", type=float, default=600, help="seconds allowed per drain (default 600)")
    a = bench.add_parser("retention", help="maintenance under ingest load: cleanup time, lock waits, p99",
                         description="1M expired dedupe rows and 1M done queue rows cleaned while ingest "
                                     "runs; then the queue table's size with the maintenance worker on")
    a.add_argument("--rate", type=int, default=2000, help="offered telemetry msg/s (default 2,000)")
    a.add_argument("--seed-rows", type=int, default=1_000_000, help="expired rows seeded per table (default 1M)")
    a.add_argument("--duration", type=float, default=60, help="seconds of the queue-size phase (default 60; "
                                                              "600 for the 10-minute run)")
    a.add_argument("--warmup", type=float, default=10, help="seconds of ingest before the cleanup (default 10)")
    a.add_argument("--no-maintenance", action="store_true",
                   help="control run: no maintenance worker in the queue-size phase")
    a.add_argument("--cleanup-max", type=float, default=300,
                   help="seconds of messages planned for the cleanup phase (default 300)")
    a.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    a.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    a = bench.add_parser("fuzz", help="bad MQTT messages of every kind against a running bridge and worker",
                         description="a generated corpus of bad MQTT messages (workers/dev/fuzz_corpus.py) "
                                     "interleaved with valid traffic against a private Mosquitto, the bridge "
                                     "and an ingest worker; every one must be dead-lettered with a reason, "
                                     "the valid traffic exact, no traceback (exit 1 otherwise)")
    a.add_argument("--bad", type=int, default=11_000, help="bad messages (default 11,000)")
    a.add_argument("--valid", type=int, default=10_000, help="valid messages (default 10,000)")
    a.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    a.add_argument("--categories", help="comma-separated subset of the corpus categories (default all)")
    a.add_argument("--media-max-bytes", type=int, default=64 * 1024,
                   help="EDGE_MEDIA_MAX_BYTES for the run (default 65536: oversized stays cheap)")
    a.add_argument("--max-payload-bytes", type=int, default=32 * 1024,
                   help="EDGE_MAX_PAYLOAD_BYTES for the run (default 32768)")
    a.add_argument("--qos0-every", type=int, default=0, metavar="N",
                   help="publish every N-th message at QoS 0 (a misconfigured device; default 0: none)")
    a.add_argument("--timeout", type=float, default=600, help="seconds allowed to settle (default 600)")
    a = bench.add_parser("chaos", help="fault suite: kill -9 / restart every process and service under "
                                       "load, then count every event (exit 1 on loss or duplicates)",
                         description="steady telemetry and session load through a private Mosquitto and "
                                     "PostgreSQL into the real processes; kill -9 and restarts on a seeded "
                                     "schedule; then 0 lost, 0 duplicated, aggregates = GROUP BY")
    a.add_argument("--duration", type=float, default=300, help="seconds of load and faults (default 300)")
    a.add_argument("--rate", type=float, default=200, help="telemetry msg/s (default 200)")
    a.add_argument("--seed", type=int, help="fault schedule seed (default: random, printed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"farmiq-edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(settings, args)
    except (psycopg2.OperationalError, sqlalchemy.exc.OperationalError) as exc:
        error = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
        print(f"farmiq-edge: cannot connect to the database: {str(error).strip()}", file=sys.stderr)
        return EXIT_CANNOT_CONNECT
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

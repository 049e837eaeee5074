"""`farmiq-edge bench WHAT`: benchmarks that print figures (scripts, not tests).

- `ingest` (workers/bench/ingest.py): MQTT → PostgreSQL throughput, latency, memory;
- `outbox` (workers/bench/outbox.py): a backlog drained to the reference cloud sink,
  and the catch-up delay after a link outage.
"""

from typing import Any

from models.settings import Settings


def run_bench(settings: Settings, args: Any) -> int:
    if args.what == "outbox":
        from workers.bench.outbox import run_outbox_bench
        return run_outbox_bench(settings, args)
    from workers.bench.ingest import run_bench as run_ingest_bench
    return run_ingest_bench(settings, args)

"""`farmiq-edge bench WHAT`: benchmarks that print figures (scripts, not tests).

- `ingest` (ingest.py): MQTT → PostgreSQL throughput, latency, memory, against
  the naive pipeline (naive.py) and bare MQTT (mqtt.py);
- `queue` (queue.py): a no-op backlog drained by real workers, ours vs stock dramatiq-pg;
- `outbox` (outbox.py): a backlog drained to the reference cloud sink, and the
  catch-up delay after a link outage;
- `inference` (inference.py): the weight model, alone and end to end;
- `retention` (retention.py): maintenance under ingest load;
- `fuzz` (fuzz.py): a generated corpus of bad messages against a running system;
- `chaos` (chaos.py): faults on a recorded schedule under load, then every count checked;
- mosquitto_durability.py: what each Mosquitto persistence setting costs (run by path).
"""

from importlib import import_module
from typing import Any

from models.settings import Settings

RUNNERS = {"ingest": ("ingest", "run_bench"), "queue": ("queue", "run_queue_bench"),
           "outbox": ("outbox", "run_outbox_bench"), "inference": ("inference", "run_inference_bench"),
           "retention": ("retention", "run_retention_bench"), "fuzz": ("fuzz", "run_fuzz_bench"),
           "chaos": ("chaos", "run_chaos_bench")}


def run_bench(settings: Settings, args: Any) -> int:
    module, function = RUNNERS[args.what]
    return getattr(import_module(f"workers.bench.{module}"), function)(settings, args)

"""`farmiq-edge bench fuzz`: the full fuzz corpus against a running system.

The setup of `farmiq-edge bench ingest` (workers/bench.py: a scratch database,
a private Mosquitto with deploy/mosquitto/mosquitto.conf, everything removed
at the end), then the real `farmiq-edge bridge` and `worker --queues ingest`
processes; `--bad` messages of every category of workers/dev/fuzz_corpus.py
interleaved with `--valid` good ones (10% of those published twice). Prints,
per category, what was sent, refused by the broker, dead-lettered and with
which reasons; the exactness of the valid traffic; tracebacks found in the
process logs. Exit 1 on any loss, duplicate, reason outside its SPEC table,
inexact valid count or traceback.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from models.settings import Settings
from workers.bench import Bench, say
from workers.dev.fuzz_corpus import CATEGORIES, Limits, bad_corpus, valid_traffic
from workers.dev.fuzz_run import interleave, send, verify, wait_settled
from workers.processes import NotReady, edge_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def run_fuzz_bench(settings: Settings, args: Any) -> int:
    categories = args.categories.split(",") if args.categories else None
    if args.bad < 1 or args.valid < 0 or (categories and set(categories) - set(CATEGORIES)):
        say(f"farmiq-edge bench fuzz: --bad ≥ 1, --valid ≥ 0, --categories from {','.join(CATEGORIES)}")
        return EXIT_USAGE
    limits = Limits(media_max_bytes=args.media_max_bytes, max_payload_bytes=args.max_payload_bytes)
    now = datetime.now(timezone.utc)
    t0 = time.monotonic()
    cases = bad_corpus(args.bad, seed=args.seed, now=now, limits=limits, categories=categories)
    valid = valid_traffic(args.valid, seed=args.seed, now=now)
    stream = interleave(cases, valid, args.seed)
    say(f"corpus     {len(cases):,} bad messages ({sum(not c.refused for c in cases):,} a broker delivers, "
        f"{sum(c.refused for c in cases):,} topics it refuses), {len(valid):,} valid "
        f"(+{len(stream) - len(cases) - len(valid):,} republished), seed {args.seed}, "
        f"{sum(len(c.payload) for c in cases) / 2**20:.0f} MB, made in {time.monotonic() - t0:.1f}s")
    say(f"limits     EDGE_MEDIA_MAX_BYTES={limits.media_max_bytes} EDGE_MAX_PAYLOAD_BYTES="
        f"{limits.max_payload_bytes} EDGE_MAX_CLOCK_SKEW={limits.env()['EDGE_MAX_CLOCK_SKEW']}")
    logging.getLogger("schema.migrate").setLevel(logging.WARNING)  # a line per migration
    bench = Bench(settings, args)
    try:
        bench.setup()
        env = {**limits.env(), "EDGE_SYNC_TELEMETRY": "raw"}
        bridge = bench.start_child("bridge", edge_command("bridge"), **env)
        worker = bench.start_child("ingest", edge_command("worker", "--queues", "ingest"), **env)
        bridge.wait_for_log("event=mqtt_subscribed")
        t_send = time.monotonic()
        refused = send(bench.broker.url, stream, qos0_every=args.qos0_every,
                       progress=lambda n: say(f"  sent {n:,}/{len(stream):,}") if n % 5000 == 0 else None)
        say(f"sent       {len(stream):,} messages in {time.monotonic() - t_send:.1f}s (all deliverable ones PUBACKed)")
        if not wait_settled(bench.db_url, cases, valid, timeout=args.timeout):
            say(f"not settled after {args.timeout:.0f}s: checking what arrived")
        if args.qos0_every:
            time.sleep(2)  # redeliveries after a bridge reconnect, if any
        say(f"settled    {time.monotonic() - t_send:.1f}s after the first message")
        alive = {p.name: p.alive() for p in (bridge, worker)}
        bridge_log = bridge.log()
        outcome = verify(bench.db_url, cases, valid, refused, {"bridge": bridge.log_path, "ingest": worker.log_path})
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything the benchmark started")
        return EXIT_FAILURE
    except (NotReady, ConnectionError) as exc:
        say(f"\nFAIL: {exc}")
        return EXIT_FAILURE
    finally:
        bench.teardown()
    say("")
    for line in outcome.lines():
        say(line)
    disconnects = bridge_log.count("event=mqtt_disconnected")
    if disconnects:
        say(f"FAIL: the bridge lost its MQTT connection {disconnects} times")
    if not all(alive.values()):
        say("FAIL: process exited during the run: " + ", ".join(n for n, up in alive.items() if not up))
        return EXIT_FAILURE
    return EXIT_OK if outcome.ok and not disconnects else EXIT_FAILURE

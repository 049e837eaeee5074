"""`farmiq-edge bench inference`: weight-model throughput and latency at 640x480, and end to end.

Three figures, all printed:
- model only: `session.run` on 640x480 frames already decoded to the model's
  input (the ONNX session the inference actor uses: EDGE_MODEL_PATH,
  EDGE_INFERENCE_THREADS), one frame per call; frames/s and per-frame p50/p99;
- decode + model: the actor's per-frame work (JPEG bytes -> tensor -> run);
- end to end: a weighing session of --frames synthetic 640x480 JPEG frames
  (workers/dev/frames.py) published over MQTT at --rate frames/s through the
  real bridge, ingest, media and inference workers (scratch database, private
  Mosquitto: the ingest benchmark's setup, workers/bench.py) until every
  frame has its inference_results row; frames/s, publish -> result p50/p99
  (the row is seen by polling every POLL_SECONDS), the dramatiq.queue message
  bytes each frame put in the queue table (logged by a trigger in the scratch
  database: processed messages are deleted) and the table's size on disk.

Not a test: the figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from actors.weight_model import WeightModel, to_input
from models.settings import Settings
from workers.dev.frames import bird_frame
from workers.processes import NotReady, edge_command

WIDTH, HEIGHT = 640, 480
DISTINCT_FRAMES = 16
POLL_SECONDS = 0.02
SETTLE_TIMEOUT_SECONDS = 300.0
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
TENANT, FARM, BARN, CAMERA = "bench-tenant", "bench-farm", "bench-barn", "bench-camera"
# Processed messages are deleted from the queue table, so what each frame put
# there is logged as it is inserted (scratch database only).
LOG_ENQUEUED = """
    CREATE TABLE bench_enqueued (queue_name text NOT NULL, bytes integer NOT NULL);
    CREATE FUNCTION bench_log_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO bench_enqueued VALUES (NEW.queue_name, pg_column_size(NEW.message));
        RETURN NEW;
    END $$;
    CREATE TRIGGER bench_log_enqueued AFTER INSERT ON dramatiq.queue
        FOR EACH ROW EXECUTE FUNCTION bench_log_enqueued();
"""
ENQUEUED = "SELECT queue_name, count(*), sum(bytes) FROM bench_enqueued GROUP BY 1 ORDER BY 1"
TABLE_SIZE = "SELECT pg_total_relation_size('dramatiq.queue')"


def say(text: str) -> None:
    print(text, flush=True)


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.1f} ms  p99 {np.percentile(ms, 99):.1f} ms"


def timed(run: Any, items: list, seconds: float) -> tuple[float, list[float]]:
    """Call `run(item)` round-robin for `seconds`; frames/s and per-call durations."""
    for item in items[:4]:
        run(item)  # warm-up
    durations: list[float] = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        item = items[len(durations) % len(items)]
        t = time.perf_counter()
        run(item)
        durations.append(time.perf_counter() - t)
    return len(durations) / (time.perf_counter() - began), durations


def model_only(settings: Settings, seconds: float) -> float:
    model = WeightModel(settings.model_path, settings.inference_threads)
    jpegs = [bird_frame(WIDTH, HEIGHT, scale=0.7 + 0.04 * i, seed=i).data for i in range(DISTINCT_FRAMES)]
    tensors = [to_input(data)[None] for data in jpegs]
    say(f"model      {model.path.name} ({model.version}), {settings.inference_threads} intra-op threads, "
        f"{WIDTH}x{HEIGHT} JPEG frames of {statistics.mean(map(len, jpegs)) / 1024:.0f} KiB")
    rate, durations = timed(model.predict, tensors, seconds)
    say(f"  model only           {rate:,.0f} frames/s   {percentiles(durations)}   "
        f"({len(durations):,} runs of one frame)")
    rate2, durations2 = timed(lambda data: model.predict(to_input(data)[None]), jpegs, seconds)
    say(f"  decode + model       {rate2:,.0f} frames/s   {percentiles(durations2)}   "
        "(JPEG bytes -> tensor -> run: the actor's work per frame)")
    return rate


class ResultWatcher(threading.Thread):
    """Polls inference_results and notes when each media_id first shows up."""

    def __init__(self, db: Any, expected: int, table_sizes: list[int]) -> None:
        super().__init__(daemon=True)
        self.db, self.expected, self.table_sizes = db, expected, table_sizes
        self.seen: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.seen) < self.expected:
            now = time.time()
            for (media_id,) in self.db.all("SELECT media_id::text FROM inference_results"):
                self.seen.setdefault(media_id, now)
            self.table_sizes.append(self.db.one(TABLE_SIZE)[0])
            self.stopping.wait(POLL_SECONDS)


def end_to_end(settings: Settings, args: Any) -> bool:
    from workers.bench import Bench, CpuMeter

    bench = Bench(settings, args)
    try:
        bench.setup()
        env = {"EDGE_MEDIA_MIN_FREE_BYTES": "0"}
        bridge = bench.start_child("bridge", edge_command("bridge"), **env)
        # The inference pool as deployed (deploy/kubernetes/base/worker-inference.yaml):
        # one thread claims batches, onnxruntime uses the cores inside a run.
        workers = [bench.start_child(q, edge_command("worker", "--queues", q), **env,
                                     **({"EDGE_WORKER_THREADS": "1"} if q == "inference" else {}))
                   for q in ("ingest", "media", "inference")]
        bridge.wait_for_log("event=mqtt_subscribed")
        for w in workers:
            w.wait_for_log("Worker process is ready for action")
        assert bench.db is not None
        frames = [bird_frame(WIDTH, HEIGHT, scale=0.7 + 0.04 * i, seed=i).data for i in range(DISTINCT_FRAMES)]
        bench.db.all("SELECT 1")  # connection ready
        with bench.db.conn.cursor() as cur:
            cur.execute(LOG_ENQUEUED)
        (table0,) = bench.db.one(TABLE_SIZE)
        peak = [table0]
        watcher = ResultWatcher(bench.db.__class__(bench.db_url), args.frames, peak)
        cpu = CpuMeter({c.name: [c.pid] for c in [bridge, *workers]} | {"mosquitto": [bench.broker.pid]},
                       alone={"bench (publisher)": os.getpid()}, pg_processes=bench.pg_processes)
        cpu.start()
        watcher.start()
        published = publish_session(bench.broker.url, bench.protocol, frames, args.frames, args.rate)
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while len(watcher.seen) < args.frames and time.monotonic() < deadline:
            time.sleep(0.2)
        watcher.stopping.set()
        watcher.join()
        cpu.stop()
        done = len(watcher.seen)
        if done < args.frames:
            say(f"  FAIL: {done}/{args.frames} frames weighed after {SETTLE_TIMEOUT_SECONDS:.0f}s; "
                f"logs in {bench.tmp}")
            return False
        enqueued = bench.db.all(ENQUEUED)
        (table1,) = bench.db.one(TABLE_SIZE)
        latencies = [watcher.seen[m] - published[m] for m in published]
        first = min(published.values())
        elapsed = max(watcher.seen.values()) - first
        say(f"  end to end           {args.frames / elapsed:,.1f} frames/s   publish → inference_results "
            f"{percentiles(latencies)}   ({args.frames} frames, "
            + (f"offered {args.rate:g}/s" if args.rate else "unpaced") + ")")
        total = sum(b for _, _, b in enqueued)
        say(f"  queue table          {total / args.frames:,.0f} message bytes enqueued per frame ("
            + ", ".join(f"{q} {n} msgs {b / args.frames:,.0f} B/frame" for q, n, b in enqueued)
            + f"); frames are {statistics.mean(map(len, frames)) / 1024:.0f} KiB, none of it in the queue")
        say(f"  queue table on disk  {table0 / 1024:,.0f} KiB before, peak {max(peak) / 1024:,.0f} KiB "
            f"during, {table1 / 1024:,.0f} KiB after (processed messages are deleted; vacuum reuses "
            "the space)")
        for line in cpu.lines():
            say(line)
        return True
    except NotReady as exc:
        say(f"  FAIL: {exc}")
        return False
    finally:
        bench.teardown()


def publish_session(mqtt_url: str, protocol: str, frames: list[bytes], n: int, rate: float) -> dict[str, float]:
    """Publish a session start and `n` frames (QoS 1); media_id -> wall-clock publish time."""
    url = urlsplit(mqtt_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-camera-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
    client.max_inflight_messages_set(100)
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    topic = f"farmiq/v1/{TENANT}/{FARM}/{BARN}/{CAMERA}/"
    session_id = str(uuid.uuid4())
    client.publish(topic + "session", json.dumps({
        "event_id": str(uuid.uuid4()), "occurred_at": datetime.now(timezone.utc).isoformat(),
        "session_id": session_id, "action": "start"}), qos=1).wait_for_publish(30)
    encoded = [base64.b64encode(f).decode() for f in frames]
    published: dict[str, float] = {}
    began = time.monotonic()
    infos = []
    for i in range(n):
        if rate:
            time.sleep(max(0.0, began + i / rate - time.monotonic()))
        media_id = str(uuid.uuid4())
        published[media_id] = time.time()
        infos.append(client.publish(topic + "media", json.dumps({
            "event_id": str(uuid.uuid4()), "occurred_at": datetime.now(timezone.utc).isoformat(),
            "media_id": media_id, "session_id": session_id, "mime_type": "image/jpeg",
            "image_b64": encoded[i % len(encoded)]}), qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()
    return published


def run_inference_bench(settings: Settings, args: Any) -> int:
    if args.frames < 1 or args.rate < 0 or args.seconds <= 0:
        say("farmiq-edge bench inference: --frames ≥ 1, --rate ≥ 0, --seconds > 0")
        return EXIT_USAGE
    rate = model_only(settings, args.seconds)
    ok = True
    if not args.model_only:
        ok = end_to_end(settings, args)
    target = 50
    say(f"\nmodel only {rate:,.0f} frames/s: " + ("PASS" if rate >= target else "FAIL") + f" (≥ {target})")
    return EXIT_OK if ok and rate >= target else EXIT_FAILURE

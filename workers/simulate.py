"""`farmiq-edge simulate`: a few pretend barn devices publishing over MQTT.

For newcomers (`farmiq-edge up` runs it) and demos, not for load: the
benchmark has its own publisher. Telemetry every few seconds per device, a
weighing session now and then, a WeighVision camera that sends a session with
a few synthetic frames (workers/dev/frames.py: a bird of known area, so the
weights in inference_results are predictable), and an occasional malformed
message so the dead-letter path shows up too.
"""

import base64
import json
import logging
import random
import signal
import threading
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from models.settings import Settings

log = logging.getLogger("farmiq_edge.simulate")
TENANT, FARM, BARN = "demo-tenant", "demo-farm", "barn-1"


def _topic(device: str, kind: str) -> str:
    return f"farmiq/v1/{TENANT}/{FARM}/{BARN}/{device}/{kind}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


CAMERA = "camera-01"
CAMERA_FRAMES = 5  # frames per weighing session, one per tick
_RUN = uuid.uuid4().hex  # session ids differ from one simulator run to the next


def _camera(client: mqtt.Client, tick: int, rng: random.Random) -> None:
    """Every 20 ticks: start a session, send CAMERA_FRAMES frames on the next ticks, finalize."""
    from workers.dev.frames import bird_frame

    step = (tick - 1) % 20  # ticks count from 1
    if step > CAMERA_FRAMES + 1:
        return
    session_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{CAMERA}/{_RUN}/{(tick - 1) // 20}"))
    if step in (0, CAMERA_FRAMES + 1):
        action = "start" if step == 0 else "finalize"
        client.publish(_topic(CAMERA, "session"), json.dumps(
            {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "session_id": session_id,
             "action": action, "batch_id": "batch-demo"}), qos=1)
        return
    frame = bird_frame(scale=rng.uniform(0.8, 1.2), seed=rng.randrange(1 << 30))
    client.publish(_topic(CAMERA, "media"), json.dumps(
        {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "session_id": session_id,
         "mime_type": "image/jpeg", "image_b64": base64.b64encode(frame.data).decode()}), qos=1)


def run_simulator(settings: Settings, *, devices: int = 5, interval: float = 2.0) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    url = urlsplit(settings.mqtt_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"farmiq-sim-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311)
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    rng = random.Random()
    sessions: dict[str, str] = {}
    tick = 0
    while not stopping.wait(interval):
        tick += 1
        for d in range(devices):
            device = f"sensor-{d:02d}"
            readings = [{"metric_type": "temperature", "metric_value": round(rng.gauss(24, 1.5), 2), "unit": "C"},
                        {"metric_type": "humidity", "metric_value": round(rng.gauss(60, 5), 1), "unit": "%"}]
            client.publish(_topic(device, "telemetry"), json.dumps(
                {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "readings": readings}), qos=1)
        scale = "scale-01"
        if tick % 10 == 1:
            sessions[scale] = str(uuid.uuid4())
            action, weight = "start", 1.8
        elif tick % 10 == 6 and scale in sessions:
            action, weight = "finalize", round(rng.uniform(1.9, 2.4), 3)
        else:
            action = None
        if action:
            client.publish(_topic(scale, "session"), json.dumps(
                {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "session_id": sessions[scale],
                 "action": action, "batch_id": "batch-demo", "weight_kg": weight}), qos=1)
        _camera(client, tick, rng)
        if tick % 15 == 0:
            client.publish(_topic("sensor-00", "telemetry"), b'{"event_id": "not-a-uuid"}', qos=1)
        log.info("event=simulated tick=%d devices=%d", tick, devices)
    client.loop_stop()
    client.disconnect()
    return 0

"""What Mosquitto's persistence settings cost, and what a kill -9 loses (issue 12 item 5).

Scenario: the bridge is down, its persistent session holds a backlog of
`--backlog` messages (100k), devices keep publishing QoS 1 at `--rate`, and
the broker is killed (-9) at a random moment. Mosquitto PUBACKs a message
when it is in memory and writes its whole store at autosave time, so what
was PUBACKed since the last save is lost. For each configuration and rate it
prints: the rate achieved, the broker's CPU, bytes written to disk per second
(flash wear), messages PUBACKed but lost at the kill, and that loss in seconds.

    .venv/bin/python workers/bench/mosquitto_durability.py            # full run
    .venv/bin/python workers/bench/mosquitto_durability.py --quick    # a smoke run

Private brokers on free ports (workers/dev/embedded.start_mosquitto with
deploy/mosquitto/mosquitto.conf and the settings under test), nothing else.
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from workers.bench.mqtt import RawPublisher, _utf8, _varint, create_session, drain_session
from workers.dev.embedded import start_mosquitto

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
TOPIC = "farmiq/v1/t/f/b/d/telemetry"

# name -> settings over deploy/mosquitto/mosquitto.conf; the file itself has
# DEPLOYED's (tests/unit/test_deploy.py checks).
DEPLOYED = "interval 1 s"
CONFIGS: dict[str, dict[str, str | None]] = {
    "interval 30 s": {"autosave_interval": "30", "autosave_on_changes": "false"},
    "interval 5 s": {"autosave_interval": "5", "autosave_on_changes": "false"},
    "interval 1 s": {"autosave_interval": "1", "autosave_on_changes": "false"},
    "every 10000 changes": {"autosave_interval": "10000", "autosave_on_changes": "true"},
    "every 1000 changes": {"autosave_interval": "1000", "autosave_on_changes": "true"},
    "every 100 changes": {"autosave_interval": "100", "autosave_on_changes": "true"},
}


def publish_packets(first_seq: int, n: int) -> list[bytes]:
    """Pre-encoded QoS 1 PUBLISH packets whose payload is the sequence number."""
    topic = _utf8(TOPIC)
    out = []
    for seq in range(first_seq, first_seq + n):
        payload = b'{"seq":%d}' % seq
        body = topic + struct.pack("!H", seq % 65535 + 1) + payload
        out.append(b"\x32" + _varint(len(body)) + body)
    return out


@dataclass
class Result:
    config: str
    rate: int
    achieved: float
    cpu_percent: float
    disk_mb_per_s: float
    acked: int
    lost: int

    @property
    def window_seconds(self) -> float:
        return self.lost / self.achieved if self.achieved else 0.0


def run_one(name: str, settings: dict[str, str | None], rate: int, backlog: int,
            seconds: float, rng: random.Random) -> Result:
    tmp = Path(tempfile.mkdtemp(prefix="farmiq-durability-"))
    broker = start_mosquitto(CONFIG, tmp, settings=settings)
    try:
        create_session(broker.url)
        pub = RawPublisher("127.0.0.1", broker.port, f"pub-{uuid.uuid4().hex[:8]}")
        # The backlog the bridge left behind.
        for i in range(0, backlog, 5000):
            pub.sock.sendall(b"".join(publish_packets(i, min(5000, backlog - i))))
        deadline = time.monotonic() + 120
        while pub.acked < backlog and time.monotonic() < deadline:
            time.sleep(0.05)
        # An old backlog is on disk already: a clean restart saves it, as an
        # earlier autosave would have. Only what comes after is at risk.
        pub.close()
        broker.restart()
        pub = RawPublisher("127.0.0.1", broker.port, f"pub-{uuid.uuid4().hex[:8]}")
        proc = psutil.Process(broker.pid)
        cpu0, io0, t0 = proc.cpu_times(), proc.io_counters(), time.monotonic()
        # Paced load, in 10 ms slices, until a random kill moment.
        kill_at = t0 + seconds * rng.uniform(0.6, 1.0)
        seq, step = backlog, max(1, rate // 100)
        while time.monotonic() < kill_at:
            pub.sock.sendall(b"".join(publish_packets(seq, step)))
            seq += step
            time.sleep(max(0.0, t0 + (seq - backlog) / rate - time.monotonic()))
        time.sleep(0.05)  # let PUBACKs for what was sent arrive
        cpu1, io1, t1 = proc.cpu_times(), proc.io_counters(), time.monotonic()
        acked = backlog + pub.acked
        broker.kill()
        pub.close()
        broker.start()
        survived = drain_session(broker.url)
        elapsed = t1 - t0
        return Result(name, rate, (seq - backlog) / elapsed,
                      100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed,
                      (io1.write_bytes - io0.write_bytes) / elapsed / 1e6,
                      acked, max(0, acked - len(survived)))
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="paced load before the kill")
    parser.add_argument("--rates", default="2000,10000")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS")
    parser.add_argument("--repeat", type=int, default=1, help="runs per config and rate (kill moments differ)")
    parser.add_argument("--quick", action="store_true", help="10k backlog, 3 s, 2,000/s, two configs")
    args = parser.parse_args()
    if args.quick:
        args.backlog, args.seconds, args.rates = 10_000, 3.0, "2000"
        args.configs = f"interval 30 s,{DEPLOYED}"
    rng = random.Random(12)
    print(f"Mosquitto {CONFIG.name}: backlog {args.backlog:,} queued for the (stopped) bridge, "
          f"paced QoS 1 load for ~{args.seconds:.0f} s, then kill -9 at a random moment")
    print(f"{'config':<26}{'rate':>8}{'achieved':>10}{'cpu %':>8}{'disk MB/s':>11}"
          f"{'acked':>10}{'lost':>8}{'window s':>10}")
    for name in args.configs.split(","):
        for rate in [int(r) for r in args.rates.split(",") for _ in range(args.repeat)]:
            r = run_one(name, CONFIGS[name], rate, args.backlog, args.seconds, rng)
            name_shown = f"{name} (deployed)" if name == DEPLOYED else name
            print(f"{name_shown:<26}{r.rate:>8,}{r.achieved:>10,.0f}{r.cpu_percent:>8.0f}"
                  f"{r.disk_mb_per_s:>11.1f}{r.acked:>10,}{r.lost:>8,}{r.window_seconds:>10.2f}", flush=True)


if __name__ == "__main__":
    main()

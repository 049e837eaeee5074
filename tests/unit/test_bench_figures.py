"""The arithmetic behind `bench ingest`'s headline figures: py-spy summaries, CPU per message."""

import pytest

from workers.bench import mqtt as bench_mqtt
from workers.bench.ingest import CpuMeter, ceiling
from workers.bench.profile import frame_name, summarize, table

RAW = """\
<module> (workers/cli.py:9);main (workers/cli.py:40);run (workers/bridge.py:100);flush (workers/bridge.py:200);execute (psycopg2/extras.py:1200) 6
<module> (workers/cli.py:9);main (workers/cli.py:40);run (workers/bridge.py:101);flush (workers/bridge.py:210) 2
<module> (workers/cli.py:9);main (workers/cli.py:40);run (workers/bridge.py:100);on_message (workers/bridge.py:50);loads (json/__init__.py:346) 1
Thread._bootstrap (threading.py:995);Thread.run (threading.py:975);rec (x.py:1);rec (x.py:2);rec (x.py:3) 1
garbage line without a count
"""


def test_frame_name_drops_the_line_number():
    assert frame_name("dumps (json/__init__.py:231)") == "dumps (json/__init__.py)"
    assert frame_name("JSONEncoder.encode (json/encoder.py:200)") == "JSONEncoder.encode (json/encoder.py)"
    assert frame_name("<native>") == "<native>"


def test_summarize_counts_inclusive_once_per_sample_and_leaves_on_top():
    s = summarize(RAW, top=4, leaves=3)
    assert s.samples == 10
    # Different lines of one function are one frame; a recursive frame counts once per sample.
    assert dict(s.inclusive)["flush (workers/bridge.py)"] == 8
    assert s.inclusive[:3] == [("<module> (workers/cli.py)", 9), ("main (workers/cli.py)", 9),
                               ("run (workers/bridge.py)", 9)]
    assert s.leaves == [("execute (psycopg2/extras.py)", 6), ("flush (workers/bridge.py)", 2),
                        ("loads (json/__init__.py)", 1)]
    everything = dict(summarize(RAW).inclusive)
    assert everything["rec (x.py)"] == 1
    assert "Thread.run (threading.py)" not in everything  # thread plumbing is left out


def test_table_shows_shares_of_the_samples_and_an_idle_process():
    lines = table("bridge", 42, 5, summarize(RAW, top=2, leaves=1))
    assert "10 busy samples in 5 s" in lines[0]
    assert "     90.0%  <module> (workers/cli.py)" in lines
    assert "     60.0%  execute (psycopg2/extras.py)" in lines
    assert table("ingest worker 2", 43, 5, summarize("")) == [
        "  profile ingest worker 2 [43]: no busy samples in 5 s (idle)"]


def test_cpu_per_message_leaves_out_the_load_generator_and_merges_postgresql():
    cpu = CpuMeter({}, {}, dict)
    cpu.used = {"bridge": 1.0, "postgresql (bench database)": 0.6, "postgresql (WAL, background)": 0.2,
                "mosquitto": 0.3, "publishers": 5.0, "bench (monitor)": 0.5}
    parts, total = cpu.per_message(20_000)
    assert parts == [("bridge", pytest.approx(50.0)), ("postgresql", pytest.approx(40.0)),
                     ("mosquitto", pytest.approx(15.0))]
    assert total == pytest.approx(105.0)
    assert ceiling(total, 2) == pytest.approx(2e6 / 105)
    assert ceiling(0.0, 2) == float("inf")


def test_c_publisher_lines_carry_the_plan_payloads_one_a_line():
    plan = bench_mqtt.Plan(300, 10, 0.1, 4, seed=1)
    lines = [bench_mqtt.payload_lines(plan, p).splitlines() for p in range(4)]
    assert sum(map(len, lines)) == plan.total_published()
    packets = [pkt for p in range(4) for pkt in bench_mqtt.encode_packets(plan, p)]
    # Same payload sizes as the pipeline's packets: the stamp has a fixed width.
    assert sorted(len(line) for ls in lines for line in ls) == sorted(
        len(prefix.split(b"{", 1)[1]) + 1 + len(bench_mqtt.STAMP_PLACEHOLDER) + len(suffix)
        for prefix, suffix in packets)
    assert all(b"\n" not in line for ls in lines for line in ls)

"""The fault suite, reduced (issue 12 item 6): the engine of `farmiq-edge bench
chaos` (workers.bench.chaos.py) with one of each fault in 90 s of load.

A private PostgreSQL and a private Mosquitto (project config) are started and
restarted by the engine; the bridge, one worker per queue and the scheduler
are the real processes, killed with SIGKILL and started again. Mosquitto is
restarted cleanly (SIGTERM): a kill -9 of it loses by design what it acked
since its last autosave (README "broker durability").
"""

from workers.bench.chaos import fault_kinds, report, run_chaos

DURATION_SECONDS = 90
RATE = 100  # telemetry msg/s, plus a session lifecycle every second
SEED = 12


def test_chaos_reduced():
    lines: list[str] = []
    result = run_chaos(DURATION_SECONDS, RATE, SEED, out=lines.append)
    report(result, out=lines.append)
    print("\n".join(lines))
    assert sorted(f.kind for f in result.faults) == sorted(fault_kinds())  # one of each
    assert all(f.recovery is not None for f in result.faults), "\n".join(lines)
    assert result.counts and all(got == want for _, got, want in result.counts), "\n".join(lines)
    assert result.ok, "\n".join(lines)

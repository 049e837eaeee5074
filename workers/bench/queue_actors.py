"""No-op actors for `farmiq-edge bench queue`: ours and stock dramatiq-pg's.

`python -m dramatiq workers.bench.queue_actors` loads ours (queue `bench_noop`);
with FARMIQ_BENCH_STOCK=1 it loads the stock dramatiq-pg broker instead
(queue `bench_stock`), so both run under the same CLI, processes and threads.
"""

import os

import dramatiq

EDGE_QUEUE, STOCK_QUEUE, ACTOR = "bench_noop", "bench_stock", "noop"

if os.environ.get("FARMIQ_BENCH_STOCK") == "1":
    from dramatiq_pg import PostgresBroker

    dramatiq.set_broker(PostgresBroker(url=os.environ["EDGE_DATABASE_URL"], results=False))
    QUEUE = STOCK_QUEUE
else:
    from actors.broker import broker  # noqa: F401 - sets the broker

    QUEUE = EDGE_QUEUE


@dramatiq.actor(queue_name=QUEUE, actor_name=ACTOR, max_retries=0)
def noop(i: int) -> None:
    return None

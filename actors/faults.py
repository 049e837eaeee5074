"""Fault injection for crash tests: die at a named commit boundary.

`EDGE_CRASH_AT=<point>` makes the process SIGKILL itself when it reaches that
point, the way a power cut or an OOM kill would: no cleanup, no flush. Unset in
production, where `crash_point` costs one dictionary lookup.

Points: bridge.before_commit, bridge.after_commit (before the PUBACKs),
ingest.before_commit, scheduler.before_commit / scheduler.after_commit (a tick
that enqueues), retention.media_files_removed (files of a page deleted, their
rows not yet), outbox.after_claim (claimed, not yet POSTed),
outbox.after_post (the cloud answered, the answer not yet recorded).
"""

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("EDGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

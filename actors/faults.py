"""Fault injection for crash tests: die at a named commit boundary.

`EDGE_CRASH_AT=<point>` makes the process SIGKILL itself when it reaches that
point, the way a power cut or an OOM kill would: no cleanup, no flush. Unset in
production, where `crash_point` costs one dictionary lookup.

Points: bridge.before_commit, bridge.after_commit (before the PUBACKs),
ingest.before_commit, scheduler.before_commit / scheduler.after_commit (a tick
that enqueues), retention.media_files_removed (files of a page deleted, their
rows not yet), outbox.after_claim (claimed, not yet POSTed),
outbox.after_post (the cloud answered, the answer not yet recorded).
bridge.after_spool (a frame's staging file is durable,
the batch not committed), media.before_rename (staged bytes verified, not yet
in place), media.before_commit (file in place, no row yet).

`EDGE_ENOSPC_WHILE=<file>`: while that file exists, `enospc_point` raises
ENOSPC (a full media volume, mid-write); remove the file and space "returns".
"""

import errno

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("EDGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def enospc_point(name: str) -> None:
    marker = os.environ.get("EDGE_ENOSPC_WHILE")
    if marker and os.path.exists(marker):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")

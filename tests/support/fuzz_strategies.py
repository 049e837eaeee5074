"""hypothesis strategies for MQTT ingress fuzzing (topics and payloads a device could send).

`corpus_cases` draws from the table in workers/dev/fuzz_corpus.py with a drawn
seed, so hypothesis explores that generator's whole space (and shrinks to a
seed), not only the fixed corpus; the others build topics and payloads from
scratch or by mutating valid ones.
"""

import random
from datetime import datetime

from hypothesis import strategies as st

from models.messages import KINDS
from workers.dev.fuzz_corpus import (CATEGORIES, Case, Context, Limits, edge_telemetry, encode, make_case,
                                     media_body, session_body, telemetry_body, topic)

_SEGMENTS = ["fuzz-tenant", "a", "b-1", "x" * 64, "x" * 65, "", ".", "..", "ä", "a b", "c\n", "+", "#",
             "\udcff", "fz_0000001", "-a", "_a", "🐔"]


def topics() -> st.SearchStrategy[str]:
    structured = st.builds(
        lambda prefix, ids, kind: "/".join([*prefix, *ids, kind]),
        st.sampled_from([("farmiq", "v1"), ("farmiq", "v2"), ("farmiq",), ("", "v1"), ("FARMIQ", "v1")]),
        st.lists(st.sampled_from(_SEGMENTS) | st.text(max_size=8), min_size=3, max_size=6),
        st.sampled_from([*KINDS, "video", "", "Telemetry"]),
    )
    return st.one_of(st.text(max_size=120), structured,
                     st.sampled_from(KINDS).map(lambda k: topic(k, "dev-1").decode()))


def valid_payloads(now: datetime) -> st.SearchStrategy[tuple[str, bytes]]:
    """(kind, payload) of a valid message; any seed."""
    def build(kind: str, seed: int) -> tuple[str, bytes]:
        rng = random.Random(seed)
        body = {"telemetry": lambda: telemetry_body(rng, now),
                "edge": lambda: edge_telemetry(rng, now, seed % 10**6)[1],
                "session": lambda: session_body(rng, now, rng.choice(["start", "finalize", "cancel"])),
                "media": lambda: media_body(rng, now, _ctx(now).images)}[kind]()
        return kind.replace("edge", "telemetry"), encode(body)
    return st.builds(build, st.sampled_from([*KINDS, "edge"]), st.integers(0, 2**32))


def mutated_payloads(now: datetime) -> st.SearchStrategy[bytes]:
    """A valid payload with bytes flipped, cut, inserted or deleted."""
    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        _, raw = draw(valid_payloads(now))
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[at] = draw(st.integers(0, 255))
            elif op == "cut":
                del data[at:]
            elif op == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif data:
                del data[at]
        return bytes(data)
    return mutate()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=16,
)


def payloads(now: datetime) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=400), mutated_payloads(now),
                     json_values.map(lambda v: encode(v)))


_CTX: dict[tuple[datetime, Limits], Context] = {}


def _ctx(now: datetime, limits: Limits = Limits()) -> Context:
    # Images are made once (Pillow is slow next to everything else here).
    key = (now, limits)
    if key not in _CTX:
        _CTX[key] = Context(now, limits)
    return _CTX[key]


def corpus_cases(now: datetime, limits: Limits = Limits()) -> st.SearchStrategy[Case]:
    return st.builds(lambda category, seed: make_case(seed % 10**7, category, random.Random(seed), _ctx(now, limits)),
                     st.sampled_from(list(CATEGORIES)), st.integers(0, 2**32))

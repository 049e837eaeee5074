"""Inference actor body (`infer_batch`, `refresh_summary`) and the baseline model, on real PostgreSQL."""

import dataclasses
import os
from datetime import timedelta
from uuid import uuid4

import numpy as np
import pytest
import onnx

from actors.inference import infer_batch, refresh_summary
from actors.ingest import ingest_events
from actors.media import store_frame
from actors.weight_model import BASELINE, WeightModel, to_input
from schema.db import transaction
from tests.integration.test_ingest import T0, session
from tests.integration.test_media import SID, parsed, query, settings, spooled
from workers.dev import build_model
from workers.dev.frames import bird_frame


def store(db_url, root, frame, **kw):
    event = spooled(root, parsed(frame.data, **kw))
    store_frame(settings(db_url, root), event)
    return event


def run(db_url, model, batch=4) -> int:
    total = 0
    while True:
        with transaction(db_url) as conn:
            claimed = infer_batch(conn, model, batch)
        total += claimed
        if claimed < batch:
            return total


def apply_session(db_url, action, at):
    with transaction(db_url) as conn:
        ingest_events(conn, [session(uuid4(), at, SID, action)], sync_telemetry="agg")


def summaries(db_url):
    return query(db_url, "SELECT id, payload_json FROM sync_outbox "
                         "WHERE event_type = 'weighvision.session.summary' ORDER BY created_at, id")


def test_shipped_model_is_what_the_script_builds():
    assert BASELINE.read_bytes() == build_model.build().SerializeToString(deterministic=True)
    meta = {p.key: p.value for p in onnx.load(str(BASELINE)).metadata_props}
    assert meta["model_version"] == build_model.MODEL_VERSION


def test_model_follows_the_law_within_two_percent():
    model = WeightModel()
    frames = [bird_frame(scale=s, seed=i) for i, s in enumerate((0.5, 0.8, 1.0, 1.3, 1.6))]
    predictions = model.predict(np.stack([to_input(f.data) for f in frames]))
    for frame, p in zip(frames, predictions):
        reference = float(build_model.reference_weight(frame.area_fraction))
        assert abs(p.weight_kg - reference) <= 0.02 * reference
        assert 0.5 < p.confidence <= 1
    blank = np.zeros((1, 3, 48, 64), np.float32)
    assert model.predict(blank)[0].weight_kg == 0 and model.predict(blank)[0].confidence == 0


def test_session_results_summary_and_late_frame(db_url, tmp_path):
    root, model = tmp_path / "media", WeightModel()
    apply_session(db_url, "start", T0)
    frames = [bird_frame(scale=0.8 + 0.05 * i, seed=i) for i in range(5)]
    for f in frames:
        store(db_url, root, f)
    assert run(db_url, model) == 5
    rows = query(db_url, "SELECT media_id, predicted_weight_kg, model_version FROM inference_results")
    assert len(rows) == 5 and {r[2] for r in rows} == {model.version}
    assert summaries(db_url) == []  # not finalized yet

    apply_session(db_url, "finalize", T0 + timedelta(minutes=1))
    assert summary_checks(db_url) == 1  # ingest asked, in the finalize transaction
    with transaction(db_url) as conn:  # what ingest's summary check message runs
        assert refresh_summary(conn, SID, model.version)
        assert not refresh_summary(conn, SID, model.version)  # once
    [(first_id, first)] = summaries(db_url)
    weights = sorted(r[1] for r in rows)
    assert first["frame_count"] == 5 and first["median_predicted_weight_kg"] == weights[2]
    assert first["model_version"] == model.version

    assert run(db_url, model) == 0  # nothing pending: a re-run adds nothing
    late = bird_frame(scale=1.5, seed=99)
    store(db_url, root, late)
    assert run(db_url, model) == 1
    [_, (second_id, second)] = summaries(db_url)
    assert second_id != first_id and second["frame_count"] == 6
    assert second["supersedes_event_id"] == str(first_id)
    counts = dict(query(db_url, "SELECT event_type, count(*) FROM sync_outbox GROUP BY 1"))
    assert counts["inference.completed"] == 6 and counts["media.stored"] == 6


def test_finalize_before_the_frames_summary_from_the_last_inference_run(db_url, tmp_path):
    root, model = tmp_path / "media", WeightModel()
    apply_session(db_url, "start", T0)
    apply_session(db_url, "finalize", T0 + timedelta(minutes=1))
    assert summary_checks(db_url) == 0  # no frame stored yet: nothing to check
    for i in range(3):
        store(db_url, root, bird_frame(seed=i))
    assert run(db_url, model, batch=2) == 3
    [(_, summary)] = summaries(db_url)
    assert summary["frame_count"] == 3


def summary_checks(db_url) -> int:
    return query(db_url, "SELECT count(*) FROM dramatiq.queue "
                         "WHERE message->>'actor_name' = 'summarize_session'")[0][0]


def test_rerun_for_a_frame_is_a_no_op(db_url, tmp_path):
    root, model = tmp_path / "media", WeightModel()
    event = store(db_url, root, bird_frame(seed=1), session_id=None)
    assert run(db_url, model) == 1
    query(db_url, "INSERT INTO inference_pending (media_id) VALUES (%s)", (str(event.media_id),))
    assert run(db_url, model) == 1
    assert query(db_url, "SELECT count(*) FROM inference_results")[0][0] == 1
    assert query(db_url, "SELECT count(*) FROM sync_outbox WHERE event_type = 'inference.completed'")[0][0] == 1
    assert query(db_url, "SELECT count(*) FROM inference_pending")[0][0] == 0


def test_a_frame_whose_file_is_gone_is_skipped_not_waited_for(db_url, tmp_path):
    root, model = tmp_path / "media", WeightModel()
    apply_session(db_url, "start", T0)
    for i in range(3):
        store(db_url, root, bird_frame(seed=i))
    [(gone,)] = query(db_url, "SELECT path FROM media_objects ORDER BY path LIMIT 1")
    os.unlink(gone)
    apply_session(db_url, "finalize", T0 + timedelta(minutes=1))
    assert run(db_url, model) == 3
    assert query(db_url, "SELECT count(*) FROM inference_results")[0][0] == 2
    [(_, summary)] = summaries(db_url)
    assert summary["frame_count"] == 2


def test_a_non_finite_prediction_is_set_aside_and_the_batch_flows_on(db_url, tmp_path):
    root, model = tmp_path / "media", WeightModel()
    for i in range(3):
        store(db_url, root, bird_frame(seed=i))

    class OneNaN:  # a model (EDGE_MODEL_PATH) that answers NaN for the first frame it sees
        version, answered = model.version, False

        def predict(self, batch):
            predictions = model.predict(batch)
            if not self.answered:
                predictions[0] = dataclasses.replace(predictions[0], weight_kg=float("nan"))
                self.answered = True
            return predictions

    assert run(db_url, OneNaN()) == 3
    assert query(db_url, "SELECT count(*) FROM inference_results")[0][0] == 2
    assert query(db_url, "SELECT count(*) FROM inference_pending")[0][0] == 0


def test_another_model_via_edge_model_path_weighs_again_under_its_version(db_url, tmp_path):
    from onnx import helper, numpy_helper
    model = build_model.build()
    for i, init in enumerate(model.graph.initializer):
        if init.name == "law_a":  # a recalibrated law: twice the weight
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(2 * build_model.A, np.float32),
                                                                        "law_a"))
    del model.metadata_props[:]
    helper.set_model_props(model, {"model_version": "recalibrated-2"})
    path = tmp_path / "other.onnx"
    path.write_bytes(model.SerializeToString())
    s = settings(db_url, tmp_path / "media", model_path=str(path))  # a valid EDGE_MODEL_PATH

    event = store(db_url, tmp_path / "media", bird_frame(seed=3), session_id=None)
    assert run(db_url, WeightModel()) == 1
    query(db_url, "INSERT INTO inference_pending (media_id) VALUES (%s)", (str(event.media_id),))
    other = WeightModel(s.model_path)
    assert other.version == "recalibrated-2"
    assert run(db_url, other) == 1
    weights = dict(query(db_url, "SELECT model_version, predicted_weight_kg FROM inference_results"))
    assert weights["recalibrated-2"] == pytest.approx(2 * weights[build_model.MODEL_VERSION], rel=1e-5)

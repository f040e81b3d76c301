"""The callbacks' shared session, without torch: which events stop training."""

from __future__ import annotations

from typing import Any

from detector.client import Event
from detector.integrations._common import TrainingSession, stops_training


def _onset(**evidence: str) -> Event:
    return Event(run_id="r", step=90, kind="COLLAPSE_ONSET", phase="collapse",
                 series="val_acc" if evidence.get("scope") == "generalization" else "train_loss",
                 evidence=evidence)


def test_only_a_training_collapse_stops_training() -> None:
    assert stops_training(_onset(scope="training"))
    assert stops_training(_onset())  # no scope: a training collapse (older detectors)
    assert not stops_training(_onset(scope="generalization"))
    assert not stops_training(Event(run_id="r", step=95, kind="COLLAPSE_END",
                                    evidence={"scope": "training"}))
    assert not stops_training(Event(run_id="r", step=5, kind="LOSS_SPIKE"))


def test_a_generalization_collapse_does_not_stop_the_session() -> None:
    seen: list[Any] = []
    session = TrainingSession("127.0.0.1:1", "r", default_prefix="t", stop_on_collapse=True,
                              on_event=seen.append)
    session._on_event(_onset(scope="generalization"))
    session._on_event(Event(run_id="r", step=120, kind="COLLAPSE_END",
                            evidence={"scope": "generalization"}))
    assert not session.should_stop() and session.stop_event is None
    assert len(seen) == 2  # the user's callback still hears of both
    training = _onset(scope="training")
    session._on_event(training)
    assert session.should_stop() and session.stop_event is training


def test_without_stop_on_collapse_a_training_collapse_is_only_remembered() -> None:
    session = TrainingSession("127.0.0.1:1", "r", default_prefix="t")
    session._on_event(_onset())
    assert session.stop_event is not None and not session.should_stop()

"""The domain-event hub (detector/events.py) and what the engine publishes to it."""

from __future__ import annotations

import numpy as np

from detector.engine import Engine
from detector.events import EventHub, EventsDetected, RunEnded, RunLeft, RunUpdated


def _spiky_loss(n: int = 400) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    steps = np.arange(n)
    loss = 2.0 * np.exp(-steps / 80.0) + 0.01 * np.random.default_rng(0).standard_normal(n)
    loss[300] += 5.0  # one spike the detector cannot miss
    return {"train_loss": (steps, loss)}


def test_the_engine_publishes_what_happens_to_a_run_in_order():
    engine = Engine()
    seen: list[object] = []
    engine.events.subscribe(seen.append)
    engine.start_run("r")
    result = engine.ingest("r", _spiky_loss())
    final = engine.end_run("r")
    engine.forget("r")
    kinds = [type(m) for m in seen]
    assert kinds[0] is RunUpdated and kinds[-2:] == [RunEnded, RunLeft]
    detected = [e for m in seen if isinstance(m, EventsDetected) for e in m.events]
    assert detected == [*result.events, *final]  # every event, once, as the calls returned them
    assert result.events  # the spike at least
    ended = next(m for m in seen if isinstance(m, RunEnded))
    assert ended.status.ended and ended.run_id == "r"
    updates = [m for m in seen if isinstance(m, RunUpdated)]
    assert updates[-1].status.last_step == 399


def test_a_failing_handler_does_not_fail_ingest_and_others_still_hear():
    hub = EventHub()
    heard: list[object] = []
    hub.subscribe(lambda _: 1 / 0)
    hub.subscribe(heard.append)
    engine = Engine(events=hub)
    assert engine.ingest("r", _spiky_loss()).accepted == 400
    assert any(isinstance(m, RunUpdated) for m in heard)


def test_unsubscribe_stops_delivery():
    hub = EventHub()
    heard: list[object] = []
    unsubscribe = hub.subscribe(heard.append)
    assert hub.handler_count == 1
    unsubscribe()
    hub.publish(RunLeft("r", 0.0))
    assert heard == [] and hub.handler_count == 0

"""The sender's parts on their own: batching, and the decision of each pass.

The whole sender (reconnects, replays, flush rotation) is exercised against a
real detector in test_client.py and test_failover.py; these pin the table that
decides each pass of its loop, state by state.
"""

from __future__ import annotations

import threading

from detector.client import ClientConfig
from detector.client._sender import _Action, _Pacing, _Sender, _Stream, build_batches

FAR = 1e18  # a flush tick that never comes during a test


def test_batches_are_columnar_and_cut_at_the_limit() -> None:
    rows = [(step, {"loss": float(step), "acc": 0.5}) for step in range(5)]
    batches = build_batches(rows, limit=4)
    assert [b.points for b in batches] == [4, 4, 2]
    assert [b.max_step for b in batches] == [1, 3, 4]
    first = batches[0].request.batch
    assert {s.name: list(s.steps) for s in first.series} == {"loss": [0, 1], "acc": [0, 1]}
    assert build_batches([], limit=4) == []


def sender(**state: object) -> _Sender:
    s = _Sender()
    s._lock = threading.Lock()
    s._cond = threading.Condition(s._lock)
    s._config = ClientConfig(reconnect_initial_backoff=5.0, reconnect_max_backoff=5.0)
    s._batch_points = 10
    s._rows, s._queued, s._held, s._inflight = [], 0, 0, []
    s._abort = s._closing = s._flush_requested = s._end_delivered = s._reconnecting = False
    s._stream = None
    s._warned, s._stats = set(), {"rejected": 0}
    s._run_id, s._target = "r", "t"
    for key, value in state.items():
        setattr(s, "_" + key, value)
    return s


def open_stream(**flags: object) -> _Stream:
    stream = _Stream()
    stream.sent = stream.acks = 1
    for key, value in flags.items():
        setattr(stream, key, value)
    return stream


def test_each_state_has_one_action() -> None:
    idle = _Pacing(interval=1.0, next_tick=FAR)
    assert sender(abort=True)._next_action(idle) == (_Action.STOP, None)
    assert sender()._next_action(idle) == (_Action.CONNECT, None)  # no stream yet
    rows = [(0, {"x": 1.0})]
    # A partial batch waits for the tick, a flush or the close.
    action, wait = sender(stream=open_stream(), rows=rows, queued=1)._next_action(idle)
    assert action is None and wait is not None and wait > 0
    assert sender(stream=open_stream(), rows=rows, queued=10)._next_action(idle)[0] is _Action.SEND
    assert sender(stream=open_stream(), rows=rows, queued=1,
                  flush_requested=True)._next_action(idle)[0] is _Action.SEND
    assert sender(stream=open_stream(), closing=True)._next_action(idle)[0] is _Action.END
    held = build_batches(rows, 10)
    assert sender(stream=open_stream(), flush_requested=True,
                  inflight=held)._next_action(idle)[0] is _Action.ROTATE
    # Half-closing: wait until the detector ends the stream.
    assert sender(stream=open_stream(end_sent=True))._next_action(idle) == (None, None)


def test_a_stream_that_ended_is_accounted_once() -> None:
    pacing = _Pacing(interval=1.0, next_tick=FAR)
    # The run end delivered with nothing held: the sender is done.
    s = sender(stream=open_stream(done=True, end_sent=True))
    assert s._next_action(pacing) == (_Action.STOP, None) and s._end_delivered
    # A rotation for a flush is not a failure: reconnect at once.
    s = sender(stream=open_stream(done=True, rotating=True))
    assert s._next_action(pacing) == (_Action.CONNECT, None)
    assert pacing.failures == 0 and not s._reconnecting
    # A failure backs off (5 s +-20 %), counts, and is not handled twice.
    broken = open_stream(done=True, error=RuntimeError("reset"))
    s = sender(stream=broken)
    action, wait = s._next_action(pacing)
    assert action is None and wait is not None and 3.9 < wait <= 6.0
    assert pacing.failures == 1 and s._reconnecting and broken.handled
    s._next_action(pacing)
    assert pacing.failures == 1

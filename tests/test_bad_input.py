"""Bad input, case by case and at random: each gets its status, and the server
goes on serving (issue 8).

A real server on port 0 and a real channel, as in ``test_server.py``. The
matrix below is the contract of DESIGN.md "Bad input gets a gRPC status":
one row per case, its expected status, what the error must say (or, for
input that is accepted, what must have happened), and then a health check
and a fresh batch on a run that was there before.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.core.types import MAX_NAME_LENGTH
from detector.engine import Engine, EngineConfig
from detector.server import RETRY_AFTER_KEY, SERVICE_NAME, create_server

TIMEOUT = 10.0
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


# --- building requests ------------------------------------------------------------


def series(name: str, steps: list[int], values: list[float]) -> pb.Series:
    return pb.Series(name=name, steps=steps, values=values)


def log_request(run_id: str, *items: pb.Series) -> pb.LogRequest:
    return pb.LogRequest(run_id=run_id, batch=pb.MetricBatch(series=list(items)))


def start(run_id: str, **kwargs: Any) -> pb.StreamRequest:
    return pb.StreamRequest(start=pb.RunStart(run_id=run_id, **kwargs))


def batch(*items: pb.Series) -> pb.StreamRequest:
    return pb.StreamRequest(batch=pb.MetricBatch(series=list(items)))


def end(final_step: int = 0) -> pb.StreamRequest:
    return pb.StreamRequest(end=pb.RunEnd(final_step=final_step))


def acks(responses: list[pb.StreamResponse]) -> list[pb.Ack]:
    return [r.ack for r in responses if r.WhichOneof("msg") == "ack"]


class Client:
    """What a case may do to the server; every call has a deadline."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.PhaseDetectorStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.raw_log = channel.unary_unary(f"/{SERVICE_NAME}/Log")  # bytes as they are

    def log(self, request: pb.LogRequest) -> pb.LogResponse:
        return self.stub.Log(request, timeout=TIMEOUT)

    def stream(self, *requests: pb.StreamRequest) -> list[pb.StreamResponse]:
        return list(self.stub.Stream(iter(requests), timeout=TIMEOUT))

    def still_serves(self, engine: Engine) -> None:
        """Health says SERVING and a run that was there before takes a new batch."""
        answer = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                   timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        step = engine.status("healthy").last_step + 1
        response = self.log(log_request("healthy", series("loss", [step], [0.5])))
        assert (response.ack.accepted, response.ack.rejected) == (1, 0)


# --- the matrix -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One kind of bad input: what to do, the status it must get, and what must hold."""

    expected: grpc.StatusCode
    act: Callable[[Client], Any]
    needle: str = ""  # must appear in the error's details
    check: Callable[[Any, Engine], None] | None = None  # on the response / engine, if OK
    config: dict[str, Any] = field(default_factory=dict)  # EngineConfig settings
    server: dict[str, Any] = field(default_factory=dict)  # create_server settings


def _accepted(n: int, rejected: int = 0) -> Callable[[Any, Engine], None]:
    def check(response: pb.LogResponse, engine: Engine) -> None:
        assert (response.ack.accepted, response.ack.rejected) == (n, rejected)

    return check


def _nan_inf_stream(responses: list[pb.StreamResponse], engine: Engine) -> None:
    assert [(a.accepted, a.rejected) for a in acks(responses)] == [(0, 0), (4, 0), (0, 0)]
    status = engine.status("s")
    assert status.ended and status.last_step == 4


# A loss that falls, levels off and jumps: enough for the detector to have something to say.
CURVE_STEPS = list(range(300))
CURVE = [2.0 * math.exp(-s / 40) + (1.5 if s >= 220 else 0.0) + 0.01 * math.sin(s)
         for s in CURVE_STEPS]


def _timeline_of(points: list[tuple[int, float]]) -> tuple[list, list]:
    """The ended run's timeline when ``points`` are logged in order to a fresh engine."""
    engine = Engine()
    engine.ingest("ref", {"loss": ([s for s, _ in points], [v for _, v in points])})
    engine.end_run("ref")
    return engine.timeline("ref")


def _ended_timeline(engine: Engine, run_id: str) -> tuple[list, list]:
    engine.end_run(run_id)
    return engine.timeline(run_id)


def _duplicates(responses: list[pb.LogResponse], engine: Engine) -> None:
    first, again = responses
    # A resent batch is accepted again, and changes nothing: not even the values
    # of the steps still held for reordering (the first value of a step stays).
    assert (first.ack.accepted, first.ack.rejected) == (300, 0)
    assert (again.ack.accepted, again.ack.rejected) == (300, 0)
    assert again.ack.through_step == first.ack.through_step
    assert engine.status("r").last_step == 299
    expected = _timeline_of(list(zip(CURVE_STEPS, CURVE, strict=True)))
    assert _ended_timeline(engine, "r") == expected
    # ... which would show: the resent values in place of the held ones change it.
    resent = [(s, v if s < 298 else 1e6) for s, v in zip(CURVE_STEPS, CURVE, strict=True)]
    assert expected != _timeline_of(resent)


def _swapped_pairs() -> list[int]:
    """0..299 with every pair swapped (1, 0, 3, 2, ...): each point one step late."""
    order = []
    for s in range(0, 300, 2):
        order += [s + 1, s]
    return order


def _reordered(response: pb.LogResponse, engine: Engine) -> None:
    assert (response.ack.accepted, response.ack.rejected) == (300, 0)
    # The detector saw the points in step order: the timeline of an ordered log.
    assert _ended_timeline(engine, "r") == _timeline_of(list(zip(CURVE_STEPS, CURVE, strict=True)))


def _too_late(responses: list[pb.LogResponse], engine: Engine) -> None:
    first, late = responses
    assert (first.ack.accepted, first.ack.rejected) == (10, 0)
    # Step 3 was never sent and the detector is already past it: rejected, counted.
    assert (late.ack.accepted, late.ack.rejected) == (0, 1)
    assert engine.snapshot().rejected_by_reason.get("out_of_order") == 1


def _resume(responses: list[pb.StreamResponse], engine: Engine) -> None:
    assert [(a.accepted, a.rejected) for a in acks(responses)] == [
        (0, 0), (2, 0), (0, 0), (2, 0), (0, 0),
    ]
    assert engine.status("s").last_step == 3


def _log_twice(*requests: pb.LogRequest) -> Callable[[Client], list[pb.LogResponse]]:
    return lambda client: [client.log(r) for r in requests]


def _watch(request: pb.WatchEventsRequest) -> Callable[[Client], list[pb.PhaseEvent]]:
    return lambda client: list(client.stub.WatchEvents(request, timeout=TIMEOUT))


def _two_runs_then_a_third(client: Client) -> None:
    client.log(log_request("second", series("loss", [1], [1.0])))  # "healthy" is the first
    client.log(log_request("third", series("loss", [1], [1.0])))


def _rate_limited(client: Client) -> None:
    client.log(log_request("r", series("loss", list(range(10)), [1.0] * 10)))
    try:
        client.log(log_request("r", series("loss", list(range(10, 20)), [1.0] * 10)))
    except grpc.RpcError as error:
        trailers = dict(error.trailing_metadata() or ())
        assert int(trailers[RETRY_AFTER_KEY]) > 0  # the client is told when to retry
        raise


def _log(run_id: str, *items: pb.Series) -> Callable[[Client], pb.LogResponse]:
    return lambda client: client.log(log_request(run_id, *items))


def _stream(*requests: pb.StreamRequest) -> Callable[[Client], list[pb.StreamResponse]]:
    return lambda client: client.stream(*requests)


def _query(method: str, request: Any) -> Callable[[Client], Any]:
    return lambda client: getattr(client.stub, method)(request, timeout=TIMEOUT)


ONE = [1]
BIG = list(range(2000))  # 2000 steps and values: about 26 kB on the wire
LONG_NAME = "x" * (MAX_NAME_LENGTH + 1)
NON_FINITE = [math.nan, math.inf, -math.inf, 1.0]
SWAPPED = _swapped_pairs()


def loss(steps: list[int], values: list[float] | None = None) -> pb.Series:
    return series("loss", steps, [1.0] * len(steps) if values is None else values)


MATRIX: dict[str, Case] = {
    # run ids and series names
    "empty-run-id": Case(INVALID, _log("", loss(ONE)), "run id is empty"),
    "overlong-run-id": Case(INVALID, _log(LONG_NAME, loss(ONE)), f"longer than {MAX_NAME_LENGTH}"),
    "non-printable-run-id": Case(INVALID, _log("run\x07", loss(ONE)), "non-printable"),
    "whitespace-run-id": Case(INVALID, _log("run 1", loss(ONE)), "whitespace"),
    "stream-empty-run-id": Case(INVALID, _stream(start("")), "run id is empty"),
    "empty-series-name": Case(INVALID, _log("r", series("", ONE, [1.0])), "series name is empty"),
    "overlong-series-name": Case(INVALID, _log("r", series(LONG_NAME, ONE, [1.0])),
                                 f"longer than {MAX_NAME_LENGTH}"),
    "non-printable-series-name": Case(INVALID, _log("r", series("lo\x00ss", ONE, [1.0])),
                                      "non-printable"),
    "stream-bad-series-name": Case(INVALID, _stream(start("s"), batch(series("a b", ONE, [1.0]))),
                                   "series name"),
    # shapes
    "log-steps-values-lengths-differ": Case(INVALID, _log("r", loss([1, 2, 3], [1.0, 2.0])),
                                            "3 steps but 2 values"),
    "stream-steps-values-lengths-differ": Case(
        INVALID, _stream(start("s"), batch(loss([1], [1.0, 2.0]))), "1 steps but 2 values"),
    # values and steps that are data, not errors
    "nan-and-inf-values": Case(OK, _log("r", loss([1, 2, 3, 4], NON_FINITE)), check=_accepted(4)),
    "stream-nan-and-inf-values": Case(
        OK, _stream(start("s"), batch(loss([1, 2, 3, 4], NON_FINITE)), end(4)),
        check=_nan_inf_stream),
    "duplicate-steps": Case(
        OK, _log_twice(log_request("r", loss(CURVE_STEPS, CURVE)),
                       log_request("r", loss(CURVE_STEPS, [1e6] * 300))),
        check=_duplicates),
    "out-of-order-within-tolerance": Case(
        OK, _log("r", loss(SWAPPED, [CURVE[s] for s in SWAPPED])), check=_reordered),
    "out-of-order-beyond-tolerance": Case(
        OK, _log_twice(log_request("r", loss([0, 1, 2, *range(4, 11)])), log_request("r", loss([3]))),
        check=_too_late),
    "negative-steps": Case(OK, _log("r", loss([-5, -1, 0, 1])), check=_accepted(2, rejected=2)),
    # queries
    "unknown-run-phase": Case(NOT_FOUND, _query("GetPhase", pb.GetPhaseRequest(run_id="nope")),
                              "unknown run 'nope'"),
    "unknown-run-timeline": Case(
        NOT_FOUND, _query("GetTimeline", pb.GetTimelineRequest(run_id="nope")), "unknown run 'nope'"),
    "watch-unspecified-kind": Case(
        INVALID, _watch(pb.WatchEventsRequest(kinds=[pb.EVENT_KIND_UNSPECIFIED])),
        "EVENT_KIND_UNSPECIFIED"),
    "watch-bad-run-id": Case(INVALID, _watch(pb.WatchEventsRequest(run_id="a\tb")), "run id"),
    # stream protocol
    "stream-first-message-batch": Case(INVALID, _stream(batch(loss(ONE))),
                                       "first message of a stream must be start"),
    "stream-first-message-end": Case(INVALID, _stream(end()), "must be start"),
    "stream-empty-message": Case(INVALID, _stream(pb.StreamRequest()), "empty StreamRequest"),
    "stream-second-start-other-run": Case(INVALID, _stream(start("a"), start("b")),
                                          "open another stream"),
    "stream-second-start-same-run": Case(
        OK, _stream(start("s"), batch(series("x", [0, 1], [1.0, 1.0])), start("s", resume=True),
                    batch(series("x", [2, 3], [1.0, 1.0])), end(3)),
        check=_resume),
    "stream-batch-after-end": Case(PRECONDITION, _stream(start("s"), end(), batch(loss(ONE))),
                                   "was ended"),
    # limits
    "log-message-too-large": Case(EXHAUSTED, _log("r", loss(BIG)), server={"max_message_bytes": 4096}),
    "stream-message-too-large": Case(EXHAUSTED, _stream(start("s"), batch(loss(BIG))),
                                     server={"max_message_bytes": 4096}),
    "too-many-series-per-run": Case(
        EXHAUSTED, _log("r", *(series(n, ONE, [1.0]) for n in "abc")),
        "more than 2 series", config={"max_series_per_run": 2}),
    "stream-too-many-series-per-run": Case(
        EXHAUSTED, _stream(start("s", series=[pb.SeriesSpec(name=n) for n in "abc"])),
        "already has 2 series", config={"max_series_per_run": 2}),
    "too-many-runs": Case(EXHAUSTED, _two_runs_then_a_third, "already has 2 runs",
                          config={"max_runs": 2}),
    "points-per-second": Case(EXHAUSTED, _rate_limited, "limit of 10 points/s",
                              config={"max_points_per_second": 10}),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_bad_input_matrix(make_server, name: str) -> None:
    case = MATRIX[name]
    engine, _, channel = make_server(config=EngineConfig(**case.config), **case.server)
    client = Client(channel)
    client.log(log_request("healthy", series("loss", [0], [1.0])))  # a run from before
    if case.expected == OK:
        result = case.act(client)
        assert case.check is not None
        case.check(result, engine)
    else:
        with pytest.raises(grpc.RpcError) as info:
            case.act(client)
        assert info.value.code() == case.expected, info.value.details()
        assert case.needle in (info.value.details() or ""), info.value.details()
    client.still_serves(engine)


def test_the_matrix_covers_the_issue() -> None:
    assert len(MATRIX) >= 20
    codes = {case.expected for case in MATRIX.values()}
    assert codes == {OK, INVALID, EXHAUSTED, NOT_FOUND, PRECONDITION}


def test_nothing_of_a_refused_batch_goes_in(make_server) -> None:
    engine, _, channel = make_server(config=EngineConfig(max_series_per_run=2))
    client = Client(channel)
    for request in (
        log_request("r", series("loss", [1, 2], [1.0, 2.0]), series("acc", [1], [1.0, 2.0])),
        log_request("r", series("a", ONE, [1.0]), series("b", ONE, [1.0]), series("c", ONE, [1.0])),
    ):
        with pytest.raises(grpc.RpcError):
            client.log(request)
    assert engine.snapshot().ingested_points == 0


# --- raw bytes on the port ----------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff" * 4096,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        # A valid HTTP/2 preface, then frames of nonsense.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)) * 16,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 500,  # a TLS ClientHello start
    ],
    ids=["binary", "http1", "h2-preface-then-junk", "tls-hello-on-plaintext"],
)
def test_raw_garbage_on_the_port(make_server, garbage: bytes) -> None:
    engine, port, channel = make_server()
    client = Client(channel)
    client.log(log_request("healthy", series("loss", [0], [1.0])))
    sockets = []
    for _ in range(8):  # several at once, some left open, some closed half-way
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(garbage)
        sockets.append(sock)
    for sock in sockets[::2]:
        sock.close()
    # The server answers the junk (a GOAWAY or a close), or waits: neither blocks it.
    time.sleep(0.2)
    client.still_serves(engine)
    fresh = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        Client(fresh).still_serves(engine)
    finally:
        fresh.close()
        for sock in sockets[1::2]:
            sock.close()


def test_raw_bytes_as_a_request_message(server) -> None:
    """A body that is not a LogRequest: gRPC's own INTERNAL, not a crash."""
    engine, _, channel = server
    client = Client(channel)
    client.log(log_request("healthy", series("loss", [0], [1.0])))
    with pytest.raises(grpc.RpcError) as info:
        client.raw_log(b"\xff\xff\xff\xff\x0f", timeout=TIMEOUT)
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    Client(channel).still_serves(engine)


# --- random messages (hypothesis) ---------------------------------------------------


@pytest.fixture(scope="module")
def shared_server() -> Iterator[tuple[Engine, Client]]:
    """One server for every example: what one example does must not break the next."""
    engine = Engine(EngineConfig(max_series_per_run=8))
    server, port = create_server(engine, max_message_bytes=64 * 1024)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = Client(channel)
    client.log(log_request("healthy", series("loss", [0], [1.0])))
    yield engine, client
    channel.close()
    server.stop(None)


NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-./:"
valid_names = st.text(NAME_CHARS, min_size=1, max_size=12)
# Anything protobuf can carry (valid UTF-8): mostly invalid as an id or a name.
any_names = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
names = st.one_of(valid_names, valid_names, any_names)
values = st.floats(allow_nan=True, allow_infinity=True)
steps = st.integers(min_value=-3, max_value=2**40)


@st.composite
def random_series(draw: st.DrawFn) -> pb.Series:
    n = draw(st.integers(0, 20))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1])) if n else draw(st.sampled_from([0, 1]))
    return series(
        draw(names), draw(st.lists(steps, min_size=n, max_size=n)),
        draw(st.lists(values, min_size=max(0, n + extra), max_size=max(0, n + extra))),
    )


def _name_ok(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LENGTH and name.isprintable() and not any(
        c.isspace() for c in name
    )


def _expected(run_id: str, items: list[pb.Series]) -> grpc.StatusCode:
    if not _name_ok(run_id) or any(
        not _name_ok(s.name) or len(s.steps) != len(s.values) for s in items
    ):
        return INVALID
    return OK


HYPOTHESIS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYPOTHESIS
@given(run_id=names, items=st.lists(random_series(), max_size=4, unique_by=lambda s: s.name))
def test_random_log_requests(shared_server, run_id: str, items: list[pb.Series]) -> None:
    engine, client = shared_server
    request = log_request(run_id, *items)
    expected = _expected(run_id, items)
    if request.ByteSize() > 64 * 1024 - 64:
        expected = EXHAUSTED  # pragma: no cover - the strategies stay far below
    try:
        response = client.log(request)
    except grpc.RpcError as error:
        assert error.code() == expected or (
            expected == OK and error.code() == EXHAUSTED and "series" in error.details()
        ), (error.code(), error.details())
    else:
        assert expected == OK
        points = sum(len(s.steps) for s in items)
        assert response.ack.accepted + response.ack.rejected == points
        # Negative steps are always refused; nothing else of a fresh batch may be
        # refused except points behind the run's detector (out of order).
        negative = sum(1 for s in items for step in s.steps if step < 0)
        assert response.ack.rejected >= negative
    client.still_serves(engine)


stream_messages = st.one_of(
    st.builds(lambda r: start(r), names),
    st.builds(lambda items: batch(*items), st.lists(random_series(), max_size=3)),
    st.builds(lambda s: end(s), steps),
    st.just(pb.StreamRequest()),
)


@HYPOTHESIS
@given(messages=st.lists(stream_messages, max_size=6), valid_start=st.booleans(),
       run_id=valid_names)
def test_random_streams(shared_server, messages: list[pb.StreamRequest], valid_start: bool,
                        run_id: str) -> None:
    engine, client = shared_server
    if valid_start:
        messages = [start(run_id), *messages]
    try:
        responses = client.stream(*messages)
    except grpc.RpcError as error:
        assert error.code() in (INVALID, PRECONDITION, EXHAUSTED), (error.code(), error.details())
        first = messages[0] if messages else None
        if first is None or first.WhichOneof("msg") != "start":
            assert error.code() == INVALID
    else:
        # Every message got exactly one ack (plus one for the flush on half-close).
        got = acks(responses)
        assert len(got) in (len(messages), len(messages) + 1)
        if messages:
            assert messages[0].WhichOneof("msg") == "start"
    client.still_serves(engine)


@HYPOTHESIS
@given(payload=st.binary(max_size=512))
def test_random_bytes_as_requests(shared_server, payload: bytes) -> None:
    """Whatever the bytes, a status (gRPC's INTERNAL when they do not parse), never a crash."""
    engine, client = shared_server
    try:
        client.raw_log(payload, timeout=TIMEOUT)
    except grpc.RpcError as error:
        assert error.code() in (INVALID, EXHAUSTED, grpc.StatusCode.INTERNAL), error.code()
    client.still_serves(engine)

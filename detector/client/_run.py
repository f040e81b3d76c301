"""A run's handle: :func:`connect`, :class:`Run` (the training thread's side;
the background half is :mod:`detector.client._sender`) and :class:`DisabledRun`.

Over 400 lines because it is mostly the public API's documentation (connect's
parameters, Run's doctest) and ``log()``'s fast and slow paths, which share the
buffer and its lock with nothing else.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from detector._proto.phasewatch.v1 import detector_pb2 as pb
from detector._proto.phasewatch.v1 import detector_pb2_grpc as pb_grpc
from detector.client._auth import read_token, tls_credentials
from detector.client._fork import FORK_ORPHANS, register, unregister
from detector.client._messages import Event, SeriesSpecLike, _name_problem, _series_spec
from detector.client._sender import _Batch, _Sender, _Stream
from detector.client._settings import (
    ClientConfig,
    ClientConfigError,
    ClientStats,
    disabled_by_env,
    logger,
    resolve_target,
)

_MAX_NAME_CACHE = 4096  # distinct series names remembered as valid
# Request metadata: this client's writer id (see detector.server.WRITER_KEY).
_WRITER_KEY = "phasewatch-writer"


class DisabledRun:
    """The run :func:`connect` returns when disabled: every call is a no-op.

    Same interface as :class:`Run`, no thread, no connection, no validation
    cost: ``log()`` returns True and keeps nothing, there are never events.

    >>> run = DisabledRun("127.0.0.1:50051", "exp-42")
    >>> run.log(0, train_loss=1.0), run.flush(), run.poll_events(), run.stats.logged
    (True, True, [], 0)
    >>> run.close(), run.closed
    (True, True)
    """

    disabled = True

    def __init__(self, target: str, run_id: str) -> None:
        self._target, self._run_id, self._closed = target, run_id, False

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def target(self) -> str:
        return self._target

    @property
    def stats(self) -> ClientStats:
        return ClientStats()

    @property
    def closed(self) -> bool:
        return self._closed

    def log(self, step: int, values: Mapping[str, float] | None = None, /, **metrics: float) -> bool:
        return True

    def flush(self, timeout: float | None = 10.0) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        self._closed = True
        return True

    def poll_events(self) -> list[Event]:
        return []

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        return iter(())

    def __enter__(self) -> DisabledRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DisabledRun({self._run_id!r})"


def connect(
    target: str | None,
    run_id: str,
    *,
    labels: Mapping[str, str] | None = None,
    series: Iterable[SeriesSpecLike] = (),
    on_event: Callable[[Event], object] | None = None,
    resume: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    tls: bool = False,
    tls_root_ca: str | os.PathLike[str] | bytes | None = None,
    tls_client_cert: str | os.PathLike[str] | bytes | None = None,
    tls_client_key: str | os.PathLike[str] | bytes | None = None,
    config: ClientConfig | None = None,
    disabled: bool | None = None,
) -> Run | DisabledRun:
    """Start streaming a run to the detector at ``target``; returns at once.

    The connection is made in the background: ``connect`` succeeds even when
    the detector is down, and the run's points are buffered until it is up.

    Parameters
    ----------
    target
        The detector's ``HOST:PORT``; None (or empty): ``$PHASEWATCH_TARGET``,
        else ``127.0.0.1:50051``.
    run_id
        The run's id (non-empty, no whitespace, at most 256 characters).
    labels
        Labels of the run (team, model, …), used by ``ListRuns`` selectors.
    series
        Series to declare up front with their role, split and direction;
        undeclared series are declared on first use with everything inferred
        from the name.
    on_event
        Called with each :class:`Event` on the client's reader thread.
    resume
        Declare the run as resumed (a restarted job continuing a run).
    credentials
        TLS channel credentials; plaintext if None and no ``tls*`` argument is given.
    token, token_file
        Bearer token, sent as ``authorization: Bearer <token>`` metadata: the
        token itself, or a file holding it (first line that is not a ``#``
        comment); with neither, ``$PHASEWATCH_TOKEN`` if set.
    tls, tls_root_ca, tls_client_cert, tls_client_key
        TLS without building ``credentials``: ``tls=True`` verifies the
        detector against the system's roots, ``tls_root_ca`` (a PEM path or
        bytes; implies TLS) against that CA; the client certificate and key
        are for mutual TLS. See :func:`tls_credentials`.
    config
        Buffer, batching, backoff and timeout settings.
    disabled
        Return a :class:`DisabledRun` (every call a no-op, nothing sent); None:
        as ``$PHASEWATCH_DISABLED`` says (``1``/``true``: disabled), so a job
        can be run unwatched without a code change.

    Raises
    ------
    ClientConfigError
        If the run id, a label, a series spec or a setting is invalid.
    """
    target = resolve_target(target)
    if disabled_by_env() if disabled is None else disabled:
        return DisabledRun(target, run_id)
    if tls or tls_root_ca is not None or tls_client_cert is not None or tls_client_key is not None:
        if credentials is not None:
            raise ClientConfigError("give credentials or the tls* arguments, not both")
        credentials = tls_credentials(tls_root_ca, tls_client_cert, tls_client_key)
    return Run(
        target,
        run_id,
        labels=labels,
        series=series,
        on_event=on_event,
        resume=resume,
        credentials=credentials,
        token=read_token(token, token_file),
        config=config,
    )



class Run(_Sender):
    """One run's handle: ``log()`` points, ``flush()``, ``close()``, read events.

    Made by :func:`connect`. Thread-safe; ``log()`` may be called from any
    thread. Usable as a context manager, which closes the run on exit.

    With no detector listening, points are buffered and, once the buffer is
    full, dropped and counted; nothing blocks and nothing raises:

    >>> run = connect("127.0.0.1:1", "doc-run", config=ClientConfig(max_buffered_points=4))
    >>> run.log(0, train_loss=2.3, val_acc=0.1)
    True
    >>> run.log(1, {"train_loss": 2.1, "val_acc": 0.1, "lr": 0.1})  # 2 + 3 > 4 points
    False
    >>> run.log(1, train_loss="oops")  # not a number: refused, counted
    False
    >>> s = run.stats
    >>> s.logged, s.dropped, s.invalid, s.buffered
    (2, 3, 1, 2)
    >>> run.close(timeout=0.1)  # nothing can be acknowledged: False
    False
    """

    def __init__(
        self,
        target: str,
        run_id: str,
        *,
        labels: Mapping[str, str] | None = None,
        series: Iterable[SeriesSpecLike] = (),
        on_event: Callable[[Event], object] | None = None,
        resume: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        problem = _name_problem("run id", run_id)
        if problem is not None:
            raise ClientConfigError(problem)
        if not isinstance(target, str) or not target:
            raise ClientConfigError(f"target must be a non-empty string, got {target!r}")
        if config is not None and not isinstance(config, ClientConfig):
            raise ClientConfigError(f"config must be a ClientConfig, got {config!r}")
        labels = dict(labels or {})
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ClientConfigError(f"labels must map strings to strings: {key!r}: {value!r}")
        if on_event is not None and not callable(on_event):
            raise ClientConfigError(f"on_event must be callable, got {on_event!r}")
        self._target = target
        self._run_id = run_id
        self._config = config or ClientConfig()
        self._start_message = pb.RunStart(
            run_id=run_id, labels=labels, series=[_series_spec(s) for s in series]
        )
        self._resume = bool(resume)
        self._callback = on_event
        self._credentials = credentials
        # The writer id tells the detector that a new stream of this run is this
        # client's own (after a disconnect its old stream may still look open
        # there): it takes the run over instead of being refused as a second writer.
        self._metadata: tuple[tuple[str, str], ...] = (
            (_WRITER_KEY, uuid.uuid4().hex),
            *((("authorization", f"Bearer {token}"),) if token else ()),
        )
        self._capacity = self._config.max_buffered_points
        self._batch_points = self._config.batch_points
        self._names: set[str] = set()  # series names known to be valid
        self._owner_pid = os.getpid()
        self._warned: set[str] = set()
        self._closed = False  # no more log(); set by close()
        self._close_result: bool | None = None
        self._init_process_state()
        register(self)
        self._start()

    # --- state that does not survive fork ------------------------------------

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rows: list[tuple[int, dict[str, float]]] = []
        self._queued = 0  # points in _rows
        self._held = 0  # points in _rows plus in _inflight
        self._max_step = -1
        self._inflight: list[_Batch] = []
        self._flush_requested = False
        self._closing = False  # the sender should deliver everything, then stop
        self._abort = False  # the sender should stop now
        self._finished = False  # the sender has stopped
        self._end_delivered = False
        self._stream: _Stream | None = None
        self._started_once = False  # a stream was opened before: resume on the next
        self._reconnecting = False  # the last stream failed: the next one is a reconnect
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.PhaseDetectorStub | None = None
        self._sender: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._events: deque[Event] = deque()
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "logged",
                "sent",
                "resent",
                "acknowledged",
                "dropped",
                "invalid",
                "rejected",
                "reconnects",
                "events",
                "events_dropped",
            ),
            0,
        )

    def _after_fork_in_child(self) -> None:
        # Threads do not survive fork and the parent's channel, call and locks
        # must not be touched here: keep references (so no destructor runs in
        # the child) and start over. The parent keeps and sends its own points.
        FORK_ORPHANS.append((self._channel, self._stream, self._lock))
        self._init_process_state()
        self._started_once = True  # the run exists: the child resumes it

    # --- the training thread's API -------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self._run_id

    @property
    def target(self) -> str:
        """The detector's address."""
        return self._target

    def log(self, step: int, values: Mapping[str, float] | None = None, /, **metrics: float) -> bool:
        """Buffer one row of metrics at ``step``; never blocks, never raises.

        Parameters
        ----------
        step
            The training step, a non-negative integer.
        values
            Metrics as a mapping of series name to number (copied).
        **metrics
            Metrics as keywords; merged over ``values``.

        Returns
        -------
        bool
            True if every point was buffered; False if any was dropped (buffer
            full, run closed) or refused as malformed. Both are counted in
            :attr:`stats` and warned about once.
        """
        try:
            if values is not None:
                metrics = {**values, **metrics} if metrics else dict(values)
            if type(step) is not int or step < 0:
                return self._log_checked(step, metrics)
            names = self._names
            for name, value in metrics.items():
                if type(value) is not float or name not in names:
                    return self._log_checked(step, metrics)
            return self._append(step, metrics)
        except Exception:  # never into the training loop
            return self._refuse_all(metrics if isinstance(metrics, dict) else {}, "bad arguments")

    def _append(self, step: int, metrics: dict[str, float]) -> bool:
        count = len(metrics)
        if not count:
            return True
        with self._lock:
            if self._closed or self._held + count > self._capacity:
                self._stats["dropped"] += count
                full = not self._closed
            else:
                self._rows.append((step, metrics))
                self._held += count
                self._queued += count
                self._stats["logged"] += count
                if step > self._max_step:
                    self._max_step = step
                if self._queued >= self._batch_points and self._queued - count < self._batch_points:
                    self._cond.notify_all()
                if self._sender is None:
                    self._start()
                return True
        if full:
            self._warn_once(
                "full",
                "phasewatch buffer is full (%d points): dropping the newest points of run %r "
                "until the detector catches up; see Run.stats.dropped",
                self._capacity,
                self._run_id,
            )
        else:
            self._warn_once("closed", "run %r is closed: log() drops its points", self._run_id)
        return False

    def _log_checked(self, step: object, metrics: dict[str, Any]) -> bool:
        """The slow path of ``log()``: convert what can be, refuse the rest."""
        try:
            index = operator.index(step)  # type: ignore[arg-type]
        except TypeError:
            index = -1
        if isinstance(step, bool) or index < 0:
            return self._refuse_all(metrics, f"step {step!r} is not a non-negative integer")
        clean: dict[str, float] = {}
        bad: list[str] = []
        names = self._names
        for name, value in metrics.items():
            if name not in names:
                problem = _name_problem("series name", name)
                if problem is not None:
                    bad.append(problem)
                    continue
                if len(names) < _MAX_NAME_CACHE:
                    names.add(name)
            if type(value) is float:
                clean[name] = value
                continue
            if value is None or isinstance(value, (str, bytes, bytearray, complex)):
                bad.append(f"{name}={value!r} is not a number")
                continue
            try:
                clean[name] = float(value)
            except Exception:
                bad.append(f"{name}={value!r} is not a number")
        if bad:
            with self._lock:
                self._stats["invalid"] += len(bad)
            self._warn_once(
                "invalid",
                "phasewatch run %r: refusing malformed points (%s); see Run.stats.invalid",
                self._run_id,
                bad[0],
            )
        appended = self._append(index, clean)
        return appended and not bad

    def _refuse_all(self, metrics: Mapping[str, Any], why: str) -> bool:
        with self._lock:
            self._stats["invalid"] += max(1, len(metrics))
        self._warn_once(
            "invalid",
            "phasewatch run %r: refusing malformed points (%s); see Run.stats.invalid",
            self._run_id,
            why,
        )
        return False

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Send what is buffered now and wait until the detector acknowledges it.

        Returns True if nothing is left unacknowledged within ``timeout``
        seconds (None: wait as long as it takes). Never raises.

        If the detector has answered every batch but still holds the last
        points back (its reorder buffer keeps the newest steps until later
        ones arrive), the sender half-closes the stream, which makes the
        detector process and acknowledge them, and resumes the run on a new
        stream. After that, log later steps only: a point at a step the
        detector has already processed counts as rejected.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            if not self._held:
                return True
            if self._sender is None and not self._finished:
                self._start()
            self._flush_requested = True
            self._cond.notify_all()
            while self._held and not self._finished:
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._flush_requested = False
            return self._held == 0

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is buffered, end the run, and stop the background threads.

        Waits at most ``timeout`` seconds (default ``config.close_timeout``).
        Returns True if every logged point was acknowledged and the run was
        ended; False otherwise (the points left are counted in the warning).
        Idempotent; never raises. In a forked child the run is flushed but not
        ended. Calling it from an ``on_event`` callback only requests the close.
        """
        if timeout is None:
            timeout = self._config.close_timeout
        try:
            return self._close(max(0.0, timeout))
        except Exception:
            logger.exception("phasewatch run %r: error while closing", self._run_id)
            return False

    def _close(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._close_result is not None:
                return self._close_result
            self._closed = True
            self._closing = True
            self._cond.notify_all()
            sender = self._sender
            if sender is None and not self._held:
                self._finished = True  # nothing was ever sent from this process
            threads = set(self._threads)
        current = threading.current_thread()
        if current in threads:
            return False  # called from our own thread (a callback): cannot wait for it
        if sender is None and self._held:
            with self._cond:
                self._start()
                sender = self._sender
        if sender is not None:
            sender.join(max(0.0, deadline - time.monotonic()))
            if sender.is_alive():
                self._stop_now()
                sender.join(1.0)
        with self._cond:
            self._finished = True
            self._cond.notify_all()
            held = self._held
            ok = held == 0 and (self._end_delivered or os.getpid() != self._owner_pid)
            self._close_result = ok
        unregister(self)
        if held:
            logger.warning(
                "phasewatch run %r closed with %d points not acknowledged by %s",
                self._run_id,
                held,
                self._target,
            )
        elif not ok:
            logger.warning(
                "phasewatch run %r: every point was acknowledged but the run end did not "
                "reach %s",
                self._run_id,
                self._target,
            )
        return ok

    def _stop_now(self) -> None:
        with self._cond:
            self._abort = True
            stream = self._stream
            self._cond.notify_all()
        if stream is not None and stream.call is not None:
            with contextlib.suppress(Exception):
                stream.call.cancel()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the client's counters."""
        with self._lock:
            stream = self._stream
            return ClientStats(
                **self._stats,
                buffered=self._held,
                connected=stream is not None and not stream.done and stream.acks > 0,
            )

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    # --- events ---------------------------------------------------------------

    def poll_events(self) -> list[Event]:
        """Return (and forget) the events received so far; never blocks."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            return events

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they arrive.

        Stops once the run is closed and every received event was yielded, or
        when no event arrived for ``timeout`` seconds (None: no limit).
        """
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._events and not self._finished:
                    if deadline is None:
                        self._cond.wait()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._events:
                    return
                event = self._events.popleft()
            yield event


    def __repr__(self) -> str:
        return f"Run(target={self._target!r}, run_id={self._run_id!r}, closed={self._closed})"

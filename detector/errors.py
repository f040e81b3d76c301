"""Domain exceptions. The gRPC adapter maps each to one status code, in one table
(:data:`detector.status.STATUS_CODES`).

Every error raised on purpose is a :class:`PhasewatchError`; where a built-in
exception means the same thing, the class subclasses it too, so callers that
know nothing of phasewatch still catch it: bad input is a ``ValueError``, an
unknown run a ``LookupError``. The others have no built-in of the same meaning
(``RuntimeError`` would say nothing, and ``ConnectionError``/``PermissionError``
are ``OSError``s that file-handling code catches for other reasons), so they
subclass only :class:`PhasewatchError`.

>>> try:
...     raise InvalidArgument("steps must increase")
... except ValueError as error:
...     print(type(error).__name__, error)
InvalidArgument steps must increase
"""


class PhasewatchError(Exception):
    """Base class of every error phasewatch raises on purpose."""


class InvalidArgument(PhasewatchError, ValueError):
    """Malformed input: bad run id or series name, mismatched lengths, bad config."""


class NotFound(PhasewatchError, LookupError):
    """A query named a run the detector does not know."""


class ResourceExhausted(PhasewatchError):
    """A configured limit was hit (series per run, runs per server, message size, rate)."""


class RateLimited(ResourceExhausted):
    """A run sent points faster than its configured points-per-second limit.

    Nothing of the refused batch was ingested; ``retry_after`` is how many
    seconds to wait before sending it again (the server passes it to clients in
    a ``google.rpc.RetryInfo``, and in the older ``phasewatch-retry-after-ms``
    trailer).
    """

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FailedPrecondition(PhasewatchError):
    """The request is valid but the run is not in a state to take it."""


class Aborted(PhasewatchError):
    """A conflict with another writer (a run owned by another replica or stream); retry later.

    ``owner`` names the writer holding the run when known (a replica, or a
    client's address): the server sends it in a ``google.rpc.ErrorInfo``.
    """

    def __init__(self, message: str, owner: str | None = None, run_id: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner
        self.run_id = run_id


class Unavailable(PhasewatchError):
    """A dependency (the store) cannot be reached now; retry later."""


class Unauthenticated(PhasewatchError):
    """Missing or wrong credentials."""


class LogFileError(PhasewatchError):
    """A run log file could not be read; the message names the file and line."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")

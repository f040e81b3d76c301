"""What every ``phasewatch`` command shares: exit codes, defaults shown in
``--help``, the one-line error, ``PHASEWATCH_<FLAG>`` defaults and the flag types.

Light on purpose (stdlib and :mod:`detector.core.types` only): building the
parser imports it, and ``phasewatch --help`` must start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from detector.core.types import EventKind, check_name
from detector.errors import InvalidArgument

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9109"
DEFAULT_TIMEOUT = 5.0
DEFAULT_FOLLOW_INTERVAL = 2.0
# Shown in --help without importing the server: tests/test_packaging.py checks
# them against detector.server, detector.guard and EngineConfig.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_WORKERS = 256
DEFAULT_MAX_SERIES_PER_RUN = 1024
DEFAULT_MAX_RUNS = 10_000
DEFAULT_BATCH_POINTS = 2048  # detector.replay's
DEFAULT_MAX_STREAMS_PER_PEER = 64  # detector.guard's
DEFAULT_MAX_UNARY = 64  # detector.guard's
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0  # detector.guard's
# Modules of the [server] extra: a command that needs one of them and finds it
# missing says which extra to install.
_SERVER_EXTRA = frozenset(
    {"scipy", "ruptures", "numba", "llvmlite", "prometheus_client", "grpc_reflection", "platformdirs"}
)
ENV_PREFIX = "PHASEWATCH_"


class CliError(Exception):
    """A failure to report as one line, with the exit code it deserves."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _fail(message: str, code: int) -> int:
    print(f"phasewatch: {message}", file=sys.stderr)
    return code


# --- the environment ---------------------------------------------------------


class _FromEnv(str):
    """A default read from an environment variable: a bad one is reported by name."""

    variable: str


def env_variable(flag: str) -> str:
    """The variable of a long flag: ``--max-runs`` -> ``PHASEWATCH_MAX_RUNS``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def env_defaults(parser: argparse.ArgumentParser, environ: Any = None) -> None:
    """Let ``PHASEWATCH_<FLAG>`` give each long flag of ``parser`` its default.

    One rule for every flag, so that an image or a Kubernetes ConfigMap/Secret
    can set any of them without replacing the container's args. A flag given on
    the command line wins (the variable is only the default). Values go through
    the flag's own type, so ``PHASEWATCH_MAX_RUNS=0`` is refused as ``--max-runs
    0`` would be, naming the variable; switches take 1/true/yes/on or
    0/false/no/off/empty. O(flags).
    """
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or isinstance(action, argparse._HelpAction):
            continue
        variable = env_variable(flags[0])
        if action.help is not None and action.help is not argparse.SUPPRESS:
            action.help += f" [${variable}]"
        value = environ.get(variable)
        if value is None:
            continue
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:
                raise CliError(f"${variable}={value!r}: expected 1/true/yes/on or "
                               "0/false/no/off", EXIT_USAGE)
            action.default = action.const if word in _TRUE else not action.const
        elif isinstance(action, argparse._StoreAction):
            default = _FromEnv(value)
            default.variable = variable
            action.default = default
            # Our parser's types are callables (no FileType, no registered names).
            action.type = _env_checked(cast("Callable[[str], Any] | None", action.type), variable)
            action.required = False


def _env_checked(parse: Callable[[str], Any] | None, variable: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if parse is None:
            return str(text)
        try:
            return parse(text)
        except (argparse.ArgumentTypeError, ValueError) as error:
            if isinstance(text, _FromEnv):
                raise argparse.ArgumentTypeError(f"{error} (from ${variable})") from None
            raise

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


@contextmanager
def _server_stack(command: str) -> Iterator[None]:
    """Imports of the detector's own modules: a missing [server] dependency is the
    user's install to fix, said in one line."""
    try:
        yield
    except ModuleNotFoundError as error:
        root = (error.name or "").partition(".")[0]
        if root not in _SERVER_EXTRA:
            raise
        raise CliError(
            f"phasewatch {command} needs the detector's dependencies ({root} is not installed): "
            "pip install 'phasewatch[server]'",
            EXIT_USAGE,
        ) from None


# --- small helpers ---------------------------------------------------------


def _print_json(document: Any) -> None:
    # allow_nan=False: the views already turn NaN into null; this keeps it so.
    print(json.dumps(document, indent=2, allow_nan=False))


def _check_run_id(run_id: str) -> None:
    problem = check_name("run id", run_id)
    if problem is not None:
        raise InvalidArgument(problem)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so that ValueError becomes argparse's usage error (exit 2)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__.lstrip("_")
    return convert


@_argument_type
def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {text}")
    return value


@_argument_type
def _resend_interval(text: str) -> float:
    # Alertmanager asks its clients to re-send every 30 s to 3 min.
    value = float(text)
    if not 30 <= value <= 180:
        raise ValueError(f"must be between 30 and 180 seconds, got {text}")
    return value


@_argument_type
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {text}")
    return value


@_argument_type
def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


@_argument_type
def _event_kind(text: str) -> EventKind:
    name = text.strip().upper().removeprefix("EVENT_KIND_")
    try:
        return EventKind(name)
    except ValueError:
        choices = ", ".join(kind.value for kind in EventKind)
        raise ValueError(f"unknown event kind {text!r}; one of {choices}") from None

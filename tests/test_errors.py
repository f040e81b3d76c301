"""Domain errors: built-in bases callers can catch, and one table to status codes."""

from __future__ import annotations

import pathlib
import re

import grpc
import pytest

from detector import errors
from detector.status import STATUS_CODES, status_code


def test_bad_input_is_a_value_error_and_an_unknown_run_a_lookup_error() -> None:
    with pytest.raises(ValueError, match="bad id"):
        raise errors.InvalidArgument("bad id")
    with pytest.raises(LookupError, match="no run"):
        raise errors.NotFound("no run")
    # Neither turns into something else on the way: the domain base still catches them.
    assert issubclass(errors.InvalidArgument, errors.PhasewatchError)
    assert issubclass(errors.NotFound, errors.PhasewatchError)
    assert not issubclass(errors.NotFound, KeyError)  # a missing run is not a dict miss


def test_every_domain_error_has_a_status() -> None:
    domain = [cls for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, errors.PhasewatchError)]
    for cls in domain:
        if cls in (errors.PhasewatchError, errors.LogFileError):
            continue  # the base, and a CLI-side error no RPC raises
        error = cls.__new__(cls)
        assert status_code(error) is not grpc.StatusCode.UNKNOWN, cls
    assert status_code(errors.RateLimited("slow down", 1.0)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert set(STATUS_CODES.values()) <= set(grpc.StatusCode)


@pytest.mark.parametrize("module", ["server/servicer.py", "server/app.py", "server/bus.py",
                                    "server/paging.py", "guard.py", "auth.py"])
def test_server_side_modules_choose_no_status_code_themselves(module: str) -> None:
    # The one table is detector/status.py: the servicer, the guard and the
    # interceptor pass domain errors to status.abort instead of naming codes.
    source = (pathlib.Path(errors.__file__).parent / module).read_text()
    assert not re.search(r"abort\(\s*grpc\.StatusCode", source)
    assert "StatusCode." not in source

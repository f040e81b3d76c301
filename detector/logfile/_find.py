"""Finding the log: TensorBoard event files, or the one log file of a directory."""

from __future__ import annotations

import os

from detector.errors import LogFileError
from detector.logfile._blocks import _TB_MAGIC

# --- finding the log -------------------------------------------------------


def _is_event_file(path: str) -> bool:
    """A TFRecord whose first record is a TensorBoard ``file_version`` event."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return _TB_MAGIC in head[12:]  # after the record's length and its checksum


def _event_files(directory: str) -> list[str]:
    """Event files under a directory, each folder's in name order (the name
    holds the time the writer opened it), the top folder's first."""
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found.extend(
            os.path.join(root, f) for f in sorted(files) if _is_event_file(os.path.join(root, f))
        )
    return found


_LOG_NAMES = ("metrics.csv", "trainer_state.json")
_LOG_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".csv")


def _log_in_directory(directory: str) -> str:
    candidates: list[str] = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        candidates.extend(
            os.path.join(root, f) for f in sorted(files)
            if f in _LOG_NAMES or f.lower().endswith(_LOG_SUFFIXES)
        )
    if candidates and all(os.path.basename(c) == "trainer_state.json" for c in candidates):
        return max(candidates, key=os.path.getmtime)  # the newest history holds the older ones
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise LogFileError(
            directory, None, "no TensorBoard event files and no log file (metrics.csv, "
            "trainer_state.json, *.jsonl, *.csv) in this directory"
        )
    shown = ", ".join(os.path.relpath(c, directory) for c in candidates[:4])
    more = f" and {len(candidates) - 4} more" if len(candidates) > 4 else ""
    raise LogFileError(directory, None, f"several log files here ({shown}{more}): name one")

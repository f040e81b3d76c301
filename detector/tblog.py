"""Read the scalars of TensorBoard event files (``events.out.tfevents.*``).

The files are read with TensorBoard's own event-file loader (the
``tensorboard`` package, the optional ``tensorboard`` extra): it is the
reader TensorBoard itself uses, it checks every record's CRC and stops
quietly at a record still being written (so a growing file is read up to its
last whole record, and the rest on the next read). Hand-parsing TFRecords and
protobufs here would duplicate that. The classic ``simple_value`` scalars are
taken as they are, and tensor scalars (``tf.summary.scalar``, TensorBoard's
own writer) through ``tensor_util.make_ndarray``; the loader's
``EventFileLoader`` variant would migrate every value to a tensor first, which
tripled the cost per point here.

What is read: every summary value whose plugin is ``scalars`` (what
``SummaryWriter.add_scalar``/``add_scalars``, Lightning's
``TensorBoardLogger``, the Hugging Face Trainer's TensorBoard callback and
``tf.summary.scalar`` write). Histograms, images, text and hyperparameters
are not series; their tags are named in a warning. Files are read in name
order (a writer's file name holds the time it was opened), so a later value
at a step replaces an earlier one, as for the text logs. Tags of event files
in a subdirectory are named ``SUBDIR/TAG``. O(records) per read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from detector.core.types import check_name
from detector.errors import LogFileError

if TYPE_CHECKING:
    from detector.logfile import _Block

_SCALARS = "scalars"


def _loader_class() -> type:
    try:
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    except ImportError:
        raise ImportError("tensorboard") from None
    return LegacyEventFileLoader


def _make_ndarray(tensor: Any) -> np.ndarray:
    from tensorboard.util.tensor_util import make_ndarray

    return make_ndarray(tensor)


class TensorBoardLog:
    """The scalars of an event file or a directory of them, read incrementally.

    Each event file keeps its loader, which remembers its offset (and retries
    a record it found cut short), so a second :meth:`blocks` reads only the
    records written since: ``phasewatch follow`` pays per new record, not per
    file. O(new records) per call, plus O(points) to hand out the columns.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._loaders: dict[str, Any] = {}
        self._points: dict[str, dict[str, tuple[list[int], list[float]]]] = {}  # file -> tag -> ...
        self._plugins: dict[str, str] = {}  # tag -> plugin, from the first event that names it
        self._skipped: dict[str, None] = {}

    def blocks(self, notes: list[str]) -> Iterator[_Block]:
        """One block per tag and file, every point read so far."""
        from detector.logfile import _Block, _event_files  # logfile imports this module lazily

        try:
            loader_class = _loader_class()
        except ImportError:
            raise LogFileError(
                self.path, None, "TensorBoard event files need the tensorboard package: "
                "pip install 'phasewatch[tensorboard]'"
            ) from None
        is_dir = os.path.isdir(self.path)
        files = _event_files(self.path) if is_dir else [self.path]
        top = self.path if is_dir else os.path.dirname(self.path)
        for file in files:
            if file not in self._loaders:
                self._loaders[file] = loader_class(file)
                self._points[file] = {}
            prefix = "" if not is_dir or os.path.dirname(file) == top else (
                os.path.relpath(os.path.dirname(file), top).replace(os.sep, "/") + "/"
            )
            self._load(file, prefix)
            for name, (steps, values) in self._points[file].items():
                yield _Block(
                    steps=np.array(steps, dtype=np.int64),
                    series={name: (None, np.array(values, dtype=np.float64))},
                    text={},
                )
        if self._skipped:
            notes.append("non-scalar summaries, not read: " + ", ".join(self._skipped))

    def _load(self, file: str, prefix: str) -> None:
        points = self._points[file]
        for event in self._loaders[file].Load():
            if event.WhichOneof("what") != "summary":
                continue
            for value in event.summary.value:
                name = prefix + value.tag
                plugin = value.metadata.plugin_data.plugin_name
                if plugin:
                    self._plugins.setdefault(name, plugin)
                kind = value.WhichOneof("value")
                if kind == "simple_value":  # the classic scalar (torch's SummaryWriter)
                    number = value.simple_value
                elif kind == "tensor" and self._plugins.get(name) == _SCALARS:
                    array = _make_ndarray(value.tensor)
                    if array.size != 1:
                        continue
                    number = float(array.reshape(-1)[0])
                else:
                    self._skipped.setdefault(name)
                    continue
                if event.step < 0:
                    raise LogFileError(file, None, f"tag {value.tag!r}: negative step {event.step}")
                if name not in points:
                    problem = check_name("series name", name)
                    if problem is not None:
                        raise LogFileError(file, None, f"tag {value.tag!r}: {problem}")
                    points[name] = ([], [])
                steps, values = points[name]
                steps.append(int(event.step))
                values.append(float(number))


def blocks(path: str, notes: list[str]) -> Iterator[_Block]:
    """The blocks of :mod:`detector.logfile` for an event file or a directory of
    them, read from the start."""
    return TensorBoardLog(path).blocks(notes)

"""Read the scalars of TensorBoard event files (``events.out.tfevents.*``).

The files are read with TensorBoard's own ``EventFileLoader`` (the
``tensorboard`` package, the optional ``tensorboard`` extra): it is the
reader TensorBoard itself uses, it checks every record's CRC, stops quietly at
a record still being written (so a growing file is read up to its last whole
record), and migrates the old ``simple_value`` summaries and the newer tensor
ones to one form. Hand-parsing TFRecords and protobufs here would duplicate
that and miss its compatibility rules.

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
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from detector.core.types import check_name
from detector.errors import LogFileError

if TYPE_CHECKING:
    from detector.logfile import _Block

_SCALARS = "scalars"


def _loader() -> tuple[type, Callable[..., np.ndarray]]:
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util.tensor_util import make_ndarray
    except ImportError:
        raise ImportError("tensorboard") from None
    return EventFileLoader, make_ndarray


def blocks(path: str, notes: list[str]) -> Iterator[_Block]:
    """The blocks of :mod:`detector.logfile` for an event file or a directory of them:
    one block per tag and file."""
    from detector.logfile import _Block, _event_files  # logfile imports this module lazily

    try:
        loader_class, make_ndarray = _loader()
    except ImportError:
        raise LogFileError(
            path, None, "TensorBoard event files need the tensorboard package: "
            "pip install 'phasewatch[tensorboard]'"
        ) from None
    files = _event_files(path) if os.path.isdir(path) else [path]
    top = path if os.path.isdir(path) else os.path.dirname(path)
    plugins: dict[str, str] = {}  # tag -> plugin, from the first event that names it
    skipped: list[str] = []
    for file in files:
        folder = os.path.relpath(os.path.dirname(file), top)
        prefix = "" if folder == "." else folder.replace(os.sep, "/") + "/"
        steps: dict[str, list[int]] = {}
        values: dict[str, list[float]] = {}
        for event in loader_class(file).Load():
            if event.WhichOneof("what") != "summary":
                continue
            for value in event.summary.value:
                name = prefix + value.tag
                plugin = value.metadata.plugin_data.plugin_name
                if plugin:
                    plugins.setdefault(name, plugin)
                if plugins.get(name) != _SCALARS or value.WhichOneof("value") != "tensor":
                    if name not in skipped and plugins.get(name) != _SCALARS:
                        skipped.append(name)
                    continue
                array = make_ndarray(value.tensor)
                if array.size != 1:
                    continue
                if event.step < 0:
                    raise LogFileError(file, None, f"tag {value.tag!r}: negative step {event.step}")
                steps.setdefault(name, []).append(int(event.step))
                values.setdefault(name, []).append(float(array.reshape(-1)[0]))
        for name, tag_steps in steps.items():
            problem = check_name("series name", name)
            if problem is not None:
                raise LogFileError(file, None, f"tag {name!r}: {problem}")
            yield _Block(
                steps=np.array(tag_steps, dtype=np.int64),
                series={name: (None, np.array(values[name], dtype=np.float64))},
                text={},
            )
    if skipped:
        notes.append("non-scalar summaries, not read: " + ", ".join(skipped))

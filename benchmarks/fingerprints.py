"""Event fingerprints of the labelled runs: has a change left every result as it was?

Speed work must leave detection results unchanged, and the summary tables of
``benchmarks.runs`` and ``benchmarks.tcpd`` can hide a moved event. This
streams every run of ``benchmarks.real_workload.run_paths`` (``../shared/runs``,
``../shared/real_runs``, ``benchmarks/generated``) through an in-process
:class:`~detector.engine.Engine` in batches of 32 and of 256 logged lines, and
through ``analyze_columns`` (the ``phasewatch analyze`` path), and hashes each
run's events in order, every field's ``repr`` (floats to the last bit) and the
analyze timeline's segments: one fingerprint per run and path.

    python -m benchmarks.fingerprints --write before.json    # on the old tree
    python -m benchmarks.fingerprints --compare before.json  # on the new one

``--compare`` prints the runs whose fingerprints differ and exits 1 if any do.
The 32- and 256-line fingerprints of a run are equal when batching does not
change results. O(points) per path; about 5 s for the 87 runs here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks import real_workload

LINES = (32, 256)


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha1()
    count = 0
    for part in parts:
        h.update(part.encode())
        h.update(b"\n")
        count += 1
    return f"{h.hexdigest()[:16]}:{count}"


def _event_key(event: object) -> str:
    return repr(sorted((k, repr(v)) for k, v in vars(event).items()))


def fingerprints(runs: Sequence[real_workload.RealRun]) -> dict[str, str]:
    """``{"<run>@<path>": "<hash>:<count>"}`` for each run and path (``@32``,
    ``@256``: the engine at that many lines a batch; ``@analyze``)."""
    from detector.analysis import analyze_columns
    from detector.engine import Engine

    out: dict[str, str] = {}
    for lines in LINES:
        engine = Engine()
        for run in runs:
            keys: list[str] = []
            for batch in real_workload.column_batches(run, lines):
                keys += [_event_key(e) for e in engine.ingest(run.name, batch).events]
            keys += [_event_key(e) for e in engine.end_run(run.name)]
            out[f"{run.name}@{lines}"] = _digest(keys)
    for run in runs:
        segments, events, _ = analyze_columns(run.columns, run_id=run.name)
        out[f"{run.name}@analyze"] = _digest([repr(v) for v in (*segments, *events)])
    return out


def compare(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Lines describing every key whose fingerprint differs or is missing on one side."""
    lines = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            lines.append(f"{key}: {before.get(key, 'absent')} -> {now.get(key, 'absent')}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="PATH", help="write the fingerprints here")
    group.add_argument("--compare", metavar="PATH", help="compare with fingerprints written before")
    args = parser.parse_args(argv)
    runs, _ = real_workload.load_repo(Path(__file__).resolve().parents[1])
    if not runs:
        print("error: no runs to fingerprint", file=sys.stderr)
        return 2
    now = fingerprints(runs)
    events = sum(int(v.split(":")[1]) for v in now.values())
    print(f"{len(runs)} runs, {len(now)} fingerprints, {events} events and segments "
          f"({real_workload.describe(runs)})")
    if args.write:
        Path(args.write).write_text(json.dumps(now, indent=0, sort_keys=True) + "\n")
        return 0
    differences = compare(json.loads(Path(args.compare).read_text()), now)
    for line in differences:
        print(line)
    print(f"{len(differences)} of {len(now)} differ")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())

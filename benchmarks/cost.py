"""Amortised cost per point and memory per series of the series detector.

Feeds one series of n points (n = 10³ … 10⁶) to a default
:class:`~detector.core.series.SeriesDetector` through ``update_many`` in
columnar batches (``--batch`` points, 1 024 by default, as the gRPC path
delivers them) and reports the wall time per point and the bytes the detector
holds: its pickled checkpoint (``state()``) and its numpy buffers. Two signals:
a noisy power-law training loss (role ``loss``) with a spike and a level drop
every 100 000 points, and stationary Gaussian noise (role ``other``). The
per-point ``update`` path is timed on the first 10⁴ points for reference.

A second cell times ``update_many`` per call on small blocks (8, 32, 64 and 256
points, the sizes a server receives), in steady state: after a warm-up of
``BLOCK_WARMUP`` points (the trigger's slow bank watching, the held window
full), the next ``BLOCK_POINTS`` points in blocks of that size; it reports the
mean µs per call (every block, alarms included) and the median (a block where
nothing happens), best of ``--repeats``.

A last cell analyses each labelled run of ``--runs`` (``../shared/runs`` by
default: six real runs; ``../shared/real_runs`` has thirty more) in-process,
as ``phasewatch analyze`` does (``read_log`` then ``analyze_columns``: every
series, the labeller, the end of the run), and reports µs per point, in all
and by stage: reading the file, the series detectors' compiled block (a block
with no alarm pending: the trigger's scan up to an alarm, the append), the
trigger's other scans, the localiser (with the alarm episodes' compiled call:
its looks and the trigger's scans between them), the labeller, the plateau
test's step bins (the trend is computed when read), the end of the run, and the rest
(engine, batching, timeline), with localisations per 1 000 points (calls of
``WindowLocaliser.look`` and the looks of the episodes' call). The stages are measured by wrapping
those methods for the duration of the cell (:class:`StageTimer`; the core
keeps no timers). Best of ``--repeats`` for the times, after one warm-up
analysis (a process's first kernel call loads numba's compiled code).

Then the same runs through the engine as the server feeds it (the engine
cell): cut into batches of 32 and 256 logged lines, 32 runs streamed at once
(taking turns a batch at a time, each run ended after its last batch), without
a store and with a SQLite file (a checkpoint a batch, ``serve``'s default
durability): CPU µs a point, and by stage (the same stages, plus the run status
made at each release and the store's commit). What a server spends on
detection alone for the real-run workload of :mod:`benchmarks.ingest`, without
gRPC and parsing (``--no-engine`` skips it); a row per batch size feeds the
same streams from 32 threads at once into SQLite, one a stream as the sync
server's handlers (total only): what threads taking turns on the engine add;
and a last one the single-thread SQLite cell again with no detection
(:func:`benchmarks.nodetect_serve.no_detection`: run detectors that find nothing;
total only): what the engine costs around detection.

The labeller's cost per ``update_block`` call on a real run and a shared run,
in blocks of 8, 32, 64 and 256 lines, comes last (:mod:`benchmarks.labeller_cost`,
under ``labeller`` in the JSON; ``--no-labeller`` skips it): a server calls it
once per received batch per run, so its fixed cost per call matters.

A machine-speed reference comes first (:func:`machine_reference`, printed and
under ``machine_reference`` in the JSON): a fixed pure-Python workload
(``sum`` of a list of 1 000 ints, the reference ``python -m timeit -s
"x=list(range(1000))" "sum(x)"`` of the project's notes) and a fixed small-numpy
one (a few ufunc calls and a reduction on 256 floats, the size of the core's
per-block numpy calls), best of several timings with the load average beside
them. Numbers from different machines or sessions compare after dividing by
these (the in-process analysis is mostly interpreter and small-call overhead).

Usage (from the repository root)::

    python -m benchmarks.cost [--max-exp 6] [--batch 1024] [--repeats 3] [--runs DIR] [--no-engine]
                              [--no-labeller]
                              [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
import timeit
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.nodetect_serve import no_detection
from detector.core.changepoint import CusumTrigger, WindowLocaliser
from detector.core.series import SeriesDetector
from detector.core.types import Direction, EventKind, Role, SeriesSpec, Split

LOSS = SeriesSpec("train_loss", Role.LOSS, Split.TRAIN, Direction.MINIMIZE)
NOISE = SeriesSpec("value", Role.OTHER, Split.TRAIN, Direction.MINIMIZE)
SHARED_RUNS = Path(__file__).resolve().parents[2] / "shared" / "runs"


def training_loss(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    y = 3.0 * (10.0 + t) ** -0.3 * np.exp(rng.normal(0.0, 0.05, n))
    for start in range(50_000, n, 100_000):
        y[start : start + 5] *= 20.0  # a transient spike
        y[start + 25_000 :] *= 0.5  # a drop that stays
    return y


def nbytes(det: SeriesDetector) -> tuple[int, int]:
    """(pickled checkpoint bytes, bytes of the detector's numpy buffers)."""
    arrays = [det._steps, det._values, det.trigger._f, det.trigger._sums, det.trigger.gate]
    return len(pickle.dumps(det.state())), sum(a.nbytes for a in arrays)


def machine_reference(repeats: int = 7) -> dict:
    """This machine's speed now, on fixed workloads: µs per call of ``sum`` over a list of
    1 000 ints (pure Python) and of a small-numpy step (``np.log``, a multiply-add and
    ``.sum()`` on 256 floats), best of ``repeats`` timings, and the load averages.
    Divide a timing by these to compare machines or sessions. About 0.1 s."""
    x = list(range(1000))
    a = np.linspace(1.0, 2.0, 256)

    def small_numpy() -> float:
        return float((np.log(a) * 0.5 + a).sum())

    def best(fn, number: int) -> float:  # noqa: ANN001 - any callable
        return 1e6 * min(timeit.repeat(fn, number=number, repeat=repeats)) / number

    return {"python_sum_1000_us": best(lambda: sum(x), 2000),
            "numpy_small_us": best(small_numpy, 1000),
            "load_average": list(os.getloadavg())}


def measure(spec: SeriesSpec, y: np.ndarray, batch: int, repeats: int = 3) -> dict:
    """Best and median of ``repeats`` runs (best: the least disturbed, as timeit reports)."""
    steps = np.arange(len(y), dtype=np.int64)
    times = []
    for _ in range(repeats):
        det = SeriesDetector(spec)
        events = 0
        start = time.perf_counter()
        for lo in range(0, len(y), batch):
            found = det.update_many(steps[lo : lo + batch], y[lo : lo + batch])
            events += sum(e.kind is EventKind.CHANGE_POINT for e in found)
        times.append(time.perf_counter() - start)
    state, buffers = nbytes(det)
    return {"points": len(y), "us_per_point": 1e6 * min(times) / len(y),
            "us_per_point_median": 1e6 * float(np.median(times)) / len(y), "repeats": repeats,
            "change_points": events, "state_bytes": state, "buffer_bytes": buffers}


BLOCK_SIZES = (8, 32, 64, 256)
BLOCK_WARMUP = 2_000  # points before timing: past bank_after and a full held window
BLOCK_POINTS = 8_192  # points timed per block size


def measure_blocks(spec: SeriesSpec, y: np.ndarray, block: int, repeats: int = 3) -> dict:
    """µs per ``update_many`` call on blocks of ``block`` points after :data:`BLOCK_WARMUP`
    points: the mean over every block (best of ``repeats``) and the median block (the
    smallest median of the repeats), with the change points found while timing."""
    steps = np.arange(len(y), dtype=np.int64)
    means, medians = [], []
    events = 0
    for _ in range(max(1, repeats)):
        det = SeriesDetector(spec)
        det.update_many(steps[:BLOCK_WARMUP], y[:BLOCK_WARMUP])
        calls = []
        events = 0
        clock = time.perf_counter
        for lo in range(BLOCK_WARMUP, len(y) - block + 1, block):
            s, v = steps[lo : lo + block], y[lo : lo + block]
            start = clock()
            found = det.update_many(s, v)
            calls.append(clock() - start)
            events += sum(e.kind is EventKind.CHANGE_POINT for e in found)
        means.append(1e6 * sum(calls) / len(calls))
        medians.append(1e6 * float(np.median(calls)))
    return {"block": block, "calls": len(calls), "us_per_call": min(means),
            "us_per_call_median": min(medians), "us_per_point": min(means) / block,
            "change_points": events}


def measure_update(spec: SeriesSpec, y: np.ndarray) -> float:
    det = SeriesDetector(spec)
    start = time.perf_counter()
    for i, v in enumerate(y.tolist()):
        det.update(i, v)
    return 1e6 * (time.perf_counter() - start) / len(y)


class StageTimer:
    """Times the stages of an analysis by wrapping core methods while active (a context manager).

    A call is charged to the stage of the outermost wrapped method running, so
    stages do not overlap: the trigger's re-warm after a confirmed break counts
    as localisation, the localisations at the end of a run as end of run. Also
    counts a series detector's looks, ``WindowLocaliser.look`` calls (the core keeps no
    counter). The wrappers cost about a microsecond a call, a few thousand calls
    a run.
    """

    def __init__(self, extra: Sequence[tuple[type, str, str]] = ()) -> None:
        from detector.core.labeller import PhaseLabeller
        from detector.core.run import RunDetector
        from detector.core.series import SeriesDetector

        self.targets = [
            (SeriesDetector, "_block", "block"), (SeriesDetector, "_scan_append", "trigger"),
            (CusumTrigger, "scan", "trigger"), (CusumTrigger, "absorb", "trigger"),
            (SeriesDetector, "_localise", "localiser"),
            # A confirmed break's events and the trigger restarted (inside _localise before
            # the alarm episodes were compiled): the localiser's, as it was.
            (SeriesDetector, "_confirmed", "localiser"),
            (PhaseLabeller, "update_block", "labeller"), (PhaseLabeller, "update", "labeller"),
            (SeriesDetector, "_plateaus", "plateaus_trend"),
            (RunDetector, "finish", "end_of_run"),
            *extra,
        ]
        self.seconds = dict.fromkeys([*RUN_STAGES[1:-1], *(stage for _, _, stage in extra)], 0.0)
        self.localisations = 0
        self._originals: list[tuple[type, str, object]] = []
        self._depth = 0

    def _wrap(self, original, stage: str):  # noqa: ANN001, ANN202 - any method
        timer = self

        def timed(*args: object, **kwargs: object) -> object:
            if timer._depth:
                return original(*args, **kwargs)
            timer._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.seconds[stage] += time.perf_counter() - start
                timer._depth -= 1

        return timed

    def __enter__(self) -> StageTimer:
        for cls, name, stage in self.targets:
            original = cls.__dict__.get(name)
            if original is None:  # an older core without this method (a baseline's)
                continue
            self._originals.append((cls, name, original))
            setattr(cls, name, self._wrap(original, stage))
        original_locate, timer = WindowLocaliser.look, self

        def counted(localiser: WindowLocaliser, *args: object, **kwargs: object) -> object:
            timer.localisations += 1
            return original_locate(localiser, *args, **kwargs)

        self._originals.append((WindowLocaliser, "look", original_locate))
        WindowLocaliser.look = counted  # type: ignore[method-assign]
        # A series detector's alarm episodes in one compiled call (its looks, and the
        # trigger's scans between them): timed as the localiser, its looks counted.
        original_episodes = SeriesDetector.__dict__.get("_episodes")
        if original_episodes is not None:  # an older core looks from Python only
            timed_episodes = self._wrap(original_episodes, "localiser")

            def episodes(*args: object) -> object:
                result = timed_episodes(*args)
                timer.localisations += result[3]  # type: ignore[index]
                return result

            self._originals.append((SeriesDetector, "_episodes", original_episodes))
            SeriesDetector._episodes = episodes  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in reversed(self._originals):
            setattr(cls, name, original)
        self._originals.clear()


RUN_STAGES = ("read", "block", "trigger", "localiser", "labeller", "plateaus_trend", "end_of_run", "other")


def measure_runs(folder: Path, repeats: int = 3) -> list[dict]:
    """In-process ``analyze`` of every labelled run in ``folder``: µs per point, by stage, and
    localisations. The total is the best of ``repeats`` plain runs; the stages come from
    the best of ``repeats`` more with :class:`StageTimer` on (``other``: the rest of the
    analysis: the engine, batching, the timeline)."""
    from detector.analysis import analyze_columns  # the analyze path (imports the server stack)
    from detector.logfile import count_points, read_log

    warm = sorted(folder.glob("*.jsonl"))[:1]
    for log in warm:  # numba loads its compiled kernels on the first call of a process
        analyze_columns(read_log(log), log.stem)
    rows = []
    for log in sorted(folder.glob("*.jsonl")):
        if not log.with_name(log.stem + ".labels.json").exists():
            continue
        plain, staged = [], []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            columns = read_log(log)
            read = time.perf_counter() - start
            start = time.perf_counter()
            analyze_columns(columns, log.stem)
            plain.append((read, time.perf_counter() - start))
        for _ in range(max(1, repeats)):
            with StageTimer() as timer:
                start = time.perf_counter()
                analyze_columns(columns, log.stem)
                total = time.perf_counter() - start
            staged.append((total, timer))
        read, analysis = min(plain, key=sum)
        total, timer = min(staged, key=lambda t: t[0])
        stages = {"read": read, **timer.seconds}
        stages["other"] = max(0.0, total - sum(timer.seconds.values()))
        rows.append({"run": log.stem, "points": count_points(columns), "read_s": read,
                     "analyze_s": analysis, "localiser_s": timer.seconds["localiser"],
                     "localisations": timer.localisations, "stages_s": stages})
    return rows


STAGES = ("points", "read_s", "analyze_s", "localiser_s", "localisations")

ENGINE_LINES = (32, 256)
ENGINE_STREAMS = 32
ENGINE_STAGES = ("block", "trigger", "localiser", "labeller", "plateaus_trend", "end_of_run", "status",
                 "store", "other")


def _engine_batches(folder: Path, lines: int) -> list[tuple[str, list[dict]]]:
    """Every labelled run of ``folder`` cut into batches of ``lines`` logged lines (every
    series' points at those lines, as ``benchmarks.real_workload`` cuts them for the server)."""
    from detector.logfile import read_log

    out = []
    for log in sorted(folder.glob("*.jsonl")):
        if not log.with_name(log.stem + ".labels.json").exists():
            continue
        columns = read_log(log)
        steps = np.unique(np.concatenate([s for s, _ in columns.values()]))
        batches = []
        for lo in range(0, len(steps), lines):
            first, last = steps[lo], steps[min(lo + lines, len(steps)) - 1]
            batch = {}
            for name, (s, v) in columns.items():
                a, b = int(np.searchsorted(s, first, "left")), int(np.searchsorted(s, last, "right"))
                if b > a:
                    batch[name] = (s[a:b].copy(), v[a:b].copy())
            batches.append(batch)
        out.append((log.stem, batches))
    return out


def _feed_engine(runs: list[tuple[str, list[dict]]], tag: str, store_url: str | None,
                 threads: int = 1) -> tuple[int, float]:
    """Stream ``runs`` into a fresh :class:`~detector.engine.Engine` as ``ENGINE_STREAMS``
    concurrent streams would (slot k takes runs k, k + streams, ...; the slots take
    turns a batch at a time; each run ended after its last batch): (points, CPU s).
    With ``threads`` > 1, thread t feeds slots t, t + threads, ... the same way, all
    at once, as a threaded server's handlers would (CPU: the whole process's)."""
    from detector.engine import Engine
    from detector.store import open_store

    engine = Engine(store=None if store_url is None else open_store(store_url))
    slots = [runs[k::ENGINE_STREAMS] for k in range(ENGINE_STREAMS)]

    def feed(mine: list[list[tuple[str, list[dict]]]]) -> int:
        cursors = [[0, 0] for _ in mine]
        points, busy = 0, True
        while busy:
            busy = False
            for slot, cursor in zip(mine, cursors, strict=True):
                if cursor[0] >= len(slot):
                    continue
                busy = True
                name, batches = slot[cursor[0]]
                run_id = f"{name}-{tag}"
                batch = batches[cursor[1]]
                engine.ingest(run_id, batch)
                points += sum(len(s) for s, _ in batch.values())
                cursor[1] += 1
                if cursor[1] == len(batches):
                    engine.end_run(run_id)
                    cursor[0], cursor[1] = cursor[0] + 1, 0
        return points

    start = time.process_time()
    if threads <= 1:
        points = feed(slots)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            points = sum(pool.map(feed, [slots[t::threads] for t in range(threads)]))
    seconds = time.process_time() - start
    if engine.store is not None:
        engine.store.close()
    return points, seconds


def measure_engine(folder: Path, repeats: int = 3) -> list[dict]:
    """The labelled runs of ``folder`` through the engine as the server feeds it (see
    :func:`_feed_engine`), batches of each of ``ENGINE_LINES`` logged lines, without a
    store and with a SQLite file (a checkpoint a batch, the server's default
    durability): CPU µs a point, best of ``repeats``, and by stage from the best of
    ``repeats`` more with :class:`StageTimer` (``status``: the run status made at each release;
    ``store``: the commit a batch; ``other``: the reorder buffer, the engine's locks
    and bookkeeping, the event economy)."""
    import tempfile

    from detector.engine import Engine
    from detector.engine.run import _Run

    rows = []
    for lines in ENGINE_LINES:
        runs = _engine_batches(folder, lines)
        for durable in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                def url(tag: str, tmp: str = tmp, durable: bool = durable) -> str | None:
                    return f"sqlite:///{tmp}/{tag}.db" if durable else None

                _feed_engine(runs, "warm", url("warm"))
                best = min(_feed_engine(runs, f"t{i}", url(f"t{i}"))[1] for i in range(max(1, repeats)))
                extra = ((_Run, "_make_status", "status"), (Engine, "_commit", "store"))
                staged = []
                for i in range(max(1, repeats)):
                    with StageTimer(extra) as timer:
                        points, total = _feed_engine(runs, f"s{i}", url(f"s{i}"))
                    staged.append((total, timer))
                total, timer = min(staged, key=lambda t: t[0])
            stages = {k: timer.seconds.get(k, 0.0) for k in ENGINE_STAGES}
            stages["other"] = max(0.0, total - sum(timer.seconds.values()))
            rows.append({"lines": lines, "store": "sqlite" if durable else "none", "threads": 1,
                         "points": points, "us_per_point": 1e6 * best / points,
                         "us_per_point_by_stage": {k: 1e6 * v / points for k, v in stages.items()},
                         "localisations_per_1000_points": 1000 * timer.localisations / points})
        # The same with SQLite, one thread a stream as the sync server has them: what
        # threads taking turns on the engine cost beyond the work (no stages: the
        # timers are not thread-safe).
        points, us = _sqlite_total(runs, repeats, ENGINE_STREAMS)
        rows.append({"lines": lines, "store": "sqlite", "threads": ENGINE_STREAMS, "points": points,
                     "us_per_point": us, "us_per_point_by_stage": None,
                     "localisations_per_1000_points": None})
        # The same single-thread SQLite cell with no detection (benchmarks.nodetect_serve):
        # what the engine costs around the run detector (reorder buffer, status, commit,
        # the run's start and end), the in-process part of ingest's full-nodetect server.
        with no_detection():
            points, us = _sqlite_total(runs, repeats)
        rows.append({"lines": lines, "store": "sqlite", "threads": 1, "detect": False, "points": points,
                     "us_per_point": us, "us_per_point_by_stage": None,
                     "localisations_per_1000_points": None})
    return rows


def _sqlite_total(runs: list[tuple[str, list[dict]]], repeats: int, threads: int = 1) -> tuple[int, float]:
    """:func:`_feed_engine` into fresh SQLite files from ``threads`` threads, after a
    warm-up: (points, CPU µs a point, best of ``repeats``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _feed_engine(runs, "warm", f"sqlite:///{tmp}/warm.db", threads)
        timed = [_feed_engine(runs, f"t{i}", f"sqlite:///{tmp}/t{i}.db", threads)
                 for i in range(max(1, repeats))]
    points = timed[0][0]
    return points, 1e6 * min(cpu for _, cpu in timed) / points


def _stage_heads(stages: Sequence[str]) -> str:
    """The stage columns' heads of a table, each at least 7 wide."""
    return " ".join(f"{k:>{max(7, len(k))}}" for k in stages)


def _stage_cells(values: dict[str, float], stages: Sequence[str], scale: float = 1.0) -> str:
    """The stage columns of one row: ``scale`` × each value, under :func:`_stage_heads`."""
    return " ".join(f"{scale * values[k]:>{max(7, len(k))}.2f}" for k in stages)


def print_engine(folder: Path, rows: list[dict]) -> None:
    print(f"engine in-process, the runs in {folder} as {ENGINE_STREAMS} streams, CPU µs a point"
          " (total: best of the plain repeats; stages: best of the timed repeats, wrappers included)")
    print(f"  {'lines':>5} {'store':>6} {'threads':>7} {'points':>8} {'µs/point':>9}"
          f" {_stage_heads(ENGINE_STAGES)} {'loc/1000':>9}")
    for r in rows:
        if r.get("detect") is False:
            print(f"  {r['lines']:>5} {r['store']:>6} {r['threads']:>7} {r['points']:>8}"
                  f" {r['us_per_point']:>9.2f}  (no detection: the engine around the run detector)")
            continue
        if r["us_per_point_by_stage"] is None:  # the threaded row: the total only
            stages = " ".join(f"{'-':>{max(7, len(k))}}" for k in ENGINE_STAGES)
            located = f"{'-':>9}"
        else:
            stages = _stage_cells(r["us_per_point_by_stage"], ENGINE_STAGES)
            located = f"{r['localisations_per_1000_points']:>9.2f}"
        print(f"  {r['lines']:>5} {r['store']:>6} {r['threads']:>7} {r['points']:>8}"
              f" {r['us_per_point']:>9.2f} {stages} {located}")


def _runs_line(name: str, r: dict) -> str:
    us = 1e6 / max(r["points"], 1)
    total = r["read_s"] + r["analyze_s"]
    stages = _stage_cells(r["stages_s"], RUN_STAGES, us)
    return (f"  {name[:34]:<34} {r['points']:>8} {us * total:>9.2f} {stages}"
            f" {r['localisations']:>6} {1000 * r['localisations'] / max(r['points'], 1):>9.2f}")


def print_runs(folder: Path, rows: list[dict]) -> dict:
    print(f"analyze in-process on the runs in {folder}: µs a point (total: best of the plain repeats;"
          " stages: best of the timed repeats), localisations")
    print(f"  {'run':<34} {'points':>8} {'µs/point':>9} {_stage_heads(RUN_STAGES)} {'#loc':>6}"
          f" {'loc/1000':>9}")
    for r in rows:
        print(_runs_line(r["run"], r))
    total = {k: sum(r[k] for r in rows) for k in STAGES}
    total["stages_s"] = {k: sum(r["stages_s"][k] for r in rows) for k in RUN_STAGES}
    print(_runs_line("all (amortised)", total))
    points = max(total["points"], 1)
    return {"folder": str(folder), "runs": rows, "points": total["points"],
            "us_per_point": 1e6 * (total["read_s"] + total["analyze_s"]) / points,
            "us_per_point_read": 1e6 * total["read_s"] / points,
            "us_per_point_analyze": 1e6 * total["analyze_s"] / points,
            "us_per_point_localiser": 1e6 * total["localiser_s"] / points,
            "us_per_point_by_stage": {k: 1e6 * v / points for k, v in total["stages_s"].items()},
            "localisations": total["localisations"],
            "localisations_per_1000_points": 1000 * total["localisations"] / points}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.split("\n")[0])
    parser.add_argument("--max-exp", type=int, default=6, help="largest n is 10**MAX_EXP (default 6)")
    parser.add_argument("--batch", type=int, default=1024, help="points per update_many call (default 1024)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per size; best and median shown (default 3)")
    parser.add_argument("--runs", type=Path, default=SHARED_RUNS, metavar="DIR",
                        help=f"labelled runs to analyze in-process (default {SHARED_RUNS}; none: skipped)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all numbers to OUT")
    parser.add_argument("--no-engine", action="store_true",
                        help="skip the engine cell (the runs as the server feeds them)")
    parser.add_argument("--no-labeller", action="store_true",
                        help="skip the labeller's cost per call (benchmarks.labeller_cost)")
    args = parser.parse_args(argv)
    ref = machine_reference()
    print(f"machine reference: sum(list of 1000 ints) {ref['python_sum_1000_us']:.2f} µs,"
          f" small numpy step {ref['numpy_small_us']:.2f} µs (best of 7);"
          f" load {' '.join(f'{v:.2f}' for v in ref['load_average'])}")
    doc: dict = {"batch": args.batch, "machine_reference": ref, "update_many": {},
                 "update_us_per_point": {}}
    print(f"SeriesDetector cost, update_many in batches of {args.batch} points, best of {args.repeats}")
    print(f"  {'signal':<14} {'n':>9} {'µs/point':>9} {'median':>7} {'#cp':>5} {'state B':>8}"
          f" {'buffers B':>9}")
    for name, spec, make in (("training_loss", LOSS, training_loss),
                             ("noise", NOISE, lambda n: np.random.default_rng(1).normal(size=n))):
        rows = []
        for exp in range(3, args.max_exp + 1):
            r = measure(spec, make(10**exp), args.batch, args.repeats)
            rows.append(r)
            print(f"  {name:<14} {r['points']:>9} {r['us_per_point']:>9.3f} {r['us_per_point_median']:>7.3f}"
                  f" {r['change_points']:>5}"
                  f" {r['state_bytes']:>8} {r['buffer_bytes']:>9}")
        doc["update_many"][name] = rows
        doc["update_us_per_point"][name] = measure_update(spec, make(10_000))
    print("update() one point at a time, first 10⁴ points: "
          + ", ".join(f"{k} {v:.1f} µs/point" for k, v in doc["update_us_per_point"].items()))
    print(f"update_many per call on small blocks, steady state (after {BLOCK_WARMUP} points,"
          f" {BLOCK_POINTS} points timed), best of {args.repeats}")
    print(f"  {'signal':<14} {'block':>6} {'µs/call':>8} {'median':>8} {'µs/point':>9} {'#cp':>5}")
    doc["blocks"] = {}
    for name, spec, make in (("training_loss", LOSS, training_loss),
                             ("noise", NOISE, lambda n: np.random.default_rng(1).normal(size=n))):
        y = make(BLOCK_WARMUP + BLOCK_POINTS)
        doc["blocks"][name] = []
        for block in BLOCK_SIZES:
            r = measure_blocks(spec, y, block, args.repeats)
            doc["blocks"][name].append(r)
            print(f"  {name:<14} {block:>6} {r['us_per_call']:>8.2f} {r['us_per_call_median']:>8.2f}"
                  f" {r['us_per_point']:>9.3f} {r['change_points']:>5}")
    if args.runs.is_dir():
        doc["runs"] = print_runs(args.runs, measure_runs(args.runs, args.repeats))
        if not args.no_engine:
            doc["engine"] = measure_engine(args.runs, args.repeats)
            print_engine(args.runs, doc["engine"])
    if not args.no_labeller:
        from benchmarks import labeller_cost

        doc["labeller"] = labeller_cost.measure(labeller_cost.DEFAULT_RUNS)
        labeller_cost.print_cell(doc["labeller"])
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fuzz soak: structure-aware and byte-mutated calls against ``phasewatch serve``.

Each call is one of the detector's RPCs with a request that is either built
from random parts (run ids valid and not, series names, steps from negative to
past the documented maximum, NaN/inf values, labels up to and beyond their
limits, page tokens, stream message sequences) or a valid request serialised
and then mutated (bytes flipped, inserted, deleted, truncated, duplicated),
sent as raw bytes. Reported: calls, status codes, INTERNAL/UNKNOWN count (must
be 0), calls a second, and the server's RSS: every 10 % of the calls (with its
breakdown by kind of mapping, :func:`benchmarks.idle_streams.memory_of`),
after warm-up, its maximum and minimum after, and the change from warm-up to
the end in per cent (flat: within 10 %).

Warm-up (``--warmup``, the first 20 % of the calls) is the fuzz building the
state it then keeps: the runs it names (40 ``fuzz-N`` and a few odd names)
each get a detector per series name sent to them (~20 KiB each, a window and
the summaries), and rare pairs (an odd run name with an odd series name) come
about once in 30 000 calls, so that state keeps filling in for a while; the
runs also grow with every accepted point. Before the RPC threads shared two
malloc arenas (:func:`detector.guard.limit_malloc_arenas`) RSS rose 279 -> 324
MiB (max 349) from the 20 000th call to the 100 000th, each of glibc's ~16
arenas keeping its own high-water mark of transient buffers; with two it
stayed within 268-286 MiB (+6.5 % at the end).

``--garbage N`` instead sends one fixed 60-byte garbage body to ``Log`` N
times (issue 18's memory-growth case) and reports RSS before and after.

Usage (repository root; Linux, for /proc)::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.fuzz [--calls 100000] [--concurrency 32]
    OPENBLAS_NUM_THREADS=1 python -m benchmarks.fuzz --garbage 15000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from detector._proto.phasewatch.v1 import detector_pb2 as pb  # noqa: E402

SERVICE = "/phasewatch.v1.PhaseDetector/"
UNARY = ("Log", "GetPhase", "GetTimeline", "ListRuns")
GARBAGE = bytes(range(7, 67))  # 60 bytes: not a LogRequest
MAX_STEP = 2**53 - 1

_NAMES = ["train_loss", "val_loss", "train_acc", "val_acc", "lr", "grad_norm", "loss",
          "x" * 256, "x" * 257, "", " ", "a b", "bad\tname", "ünï", "\x00", "é" * 130]


def _msg(cls: Any, **fields: Any) -> Any:
    """``cls(**fields)`` without the fields an older proto lacks (to fuzz older servers)."""
    known = cls.DESCRIPTOR.fields_by_name
    return cls(**{k: v for k, v in fields.items() if k in known})


def _name(rng: random.Random, pool: int = 40) -> str:
    if rng.random() < 0.8:
        return f"fuzz-{rng.randrange(pool)}"
    return rng.choice(_NAMES)


def _steps(rng: random.Random, n: int) -> list[int]:
    mode = rng.random()
    if mode < 0.6:
        start = rng.randrange(0, 100_000)
        return [start + i for i in range(n)]
    choices = [-1, 0, 1, -(2**63), 2**63 - 1, MAX_STEP, MAX_STEP + 1, 2**62, 2**31,
               rng.randrange(-10, 10**6)]
    return [rng.choice(choices) for _ in range(n)]


def _values(rng: random.Random, n: int) -> list[float]:
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308, -1e308, 5e-324]
    return [rng.choice(special) if rng.random() < 0.1 else rng.gauss(1, 1) for _ in range(n)]


def _batch(rng: random.Random) -> pb.MetricBatch:
    series = []
    for _ in range(rng.randrange(0, 4)):
        n = rng.choice([0, 1, 3, 20, 200])
        extra = rng.choice([0, 0, 0, 0, 1, -1]) if n else 0
        series.append(pb.Series(name=rng.choice(_NAMES[:7]) if rng.random() < 0.9
                                else rng.choice(_NAMES), steps=_steps(rng, n),
                                values=_values(rng, max(0, n + extra))))
    return pb.MetricBatch(series=series)


def _labels(rng: random.Random) -> dict[str, str]:
    count = rng.choice([0, 1, 3, 64, 65])
    size = rng.choice([1, 10, 1024, 1025])
    return {f"k{i}": "v" * size for i in range(count)}


def _start(rng: random.Random) -> pb.RunStart:
    return _msg(pb.RunStart, run_id=_name(rng), labels=_labels(rng) if rng.random() < 0.3 else {},
                       resume=rng.random() < 0.5, restart=rng.random() < 0.05)


def structured(rng: random.Random) -> tuple[str, Any]:
    """A random but well-formed request: (method, message or list of stream messages)."""
    method = rng.choice(UNARY + ("Stream",))
    if method == "Log":
        request = pb.LogRequest(run_id=_name(rng), batch=_batch(rng))
        if rng.random() < 0.3:
            request.start.CopyFrom(_start(rng))
        return method, request
    if method == "GetPhase":
        return method, pb.GetPhaseRequest(run_id=_name(rng))
    if method == "GetTimeline":
        return method, _msg(pb.GetTimelineRequest,
            run_id=_name(rng), page_size=rng.choice([0, 1, -1, 10**6]),
            page_token=rng.choice(["", "", "garbage", "eyJ4IjogMX0", "WyJlIiwgIiIsICI1Il0"]))
    if method == "ListRuns":
        return method, _msg(pb.ListRunsRequest,
            label_selector=_labels(rng) if rng.random() < 0.2 else {},
            phase=rng.choice([0, 1, 2, 99]), page_size=rng.choice([0, 1, 7, -5, 10**7]),
            page_token=rng.choice(["", "", "%%%", "WyJyIiwgIiIsICJmdXp6LTEiXQ"]))
    messages = []
    if rng.random() < 0.9:
        messages.append(pb.StreamRequest(start=_start(rng)))
    for _ in range(rng.randrange(0, 5)):
        kind = rng.random()
        if kind < 0.7:
            messages.append(pb.StreamRequest(batch=_batch(rng)))
        elif kind < 0.8:
            messages.append(pb.StreamRequest(end=pb.RunEnd(final_step=rng.choice(
                [0, 5, -1, 2**63 - 1]))))
        elif kind < 0.9:
            messages.append(pb.StreamRequest(start=_start(rng)))
        else:
            messages.append(pb.StreamRequest())
    return "Stream", messages


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with 1-4 random byte-level mutations."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 2 and buf:
            del buf[at:at + rng.randrange(1, 9)]
        elif op == 3:
            del buf[at:]
        elif op == 4 and buf:
            buf[at:at] = buf[max(0, at - 16):at]
        else:
            buf[at:at] = rng.choice([b"\xff\xff\xff\xff\x0f", b"\x0a\xff\x7f", b"\x12\x80\x80"])
    return bytes(buf)


async def _call(channel: grpc.aio.Channel, rng: random.Random, codes: Counter) -> None:
    method, request = structured(rng)
    mutated = rng.random() < 0.5
    timeout = 30.0
    try:
        if method == "Stream":
            bodies = [m.SerializeToString() for m in request]
            if mutated and bodies:
                i = rng.randrange(len(bodies))
                bodies[i] = mutate(rng, bodies[i])
            call = channel.stream_stream(SERVICE + method)(iter(bodies), timeout=timeout)
            async for _ in call:
                pass
        else:
            body = request.SerializeToString()
            if mutated:
                body = mutate(rng, body)
            await channel.unary_unary(SERVICE + method)(body, timeout=timeout)
        codes["OK"] += 1
    except grpc.aio.AioRpcError as error:
        if "execute_batch" in (error.debug_error_string() or ""):
            # The client's own: it was still writing stream messages after the
            # server had answered (an early INVALID_ARGUMENT); not a server status.
            codes["client: write after the server ended the stream"] += 1
            return
        codes[error.code().name] += 1
        if error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            codes[f"! {method}: {error.details()}"] += 1
        elif error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            # Which preconditions: a damaged checkpoint here would be a bug.
            codes[f"? {' '.join((error.details() or '').split()[2:8])}"] += 1


async def fuzz(target: str, calls: int, *, seed: int = 0, concurrency: int = 32,
               on_progress: Any = None) -> Counter:
    """Send ``calls`` fuzzed calls to ``target``; the status codes, counted.

    ``on_progress(done)`` is called every 1 % of the calls (the RSS samples)."""
    codes: Counter = Counter()
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    done = 0
    step = max(1, calls // 100)

    async def worker(index: int) -> None:
        nonlocal done
        rng = random.Random(seed * 1000 + index)
        channel = channels[index % len(channels)]
        while done < calls:
            done += 1
            mine = done
            await _call(channel, rng, codes)
            if on_progress is not None and mine % step == 0:
                on_progress(mine)

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for channel in channels:
            await channel.close()
    return codes


async def garbage(target: str, calls: int, concurrency: int = 32) -> Counter:
    codes: Counter = Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        log = channel.unary_unary(SERVICE + "Log")
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                try:
                    await log(GARBAGE, timeout=30)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


def main(argv: list[str] | None = None) -> int:
    from benchmarks.idle_streams import memory_of
    from benchmarks.ingest import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=0.2, metavar="FRACTION",
                        help="the first this fraction of the calls is warm-up (default 0.2): "
                        "the fuzz's runs and series are being created (see the module)")
    parser.add_argument("--garbage", type=int, default=0, metavar="N",
                        help="send N fixed garbage Log bodies instead of fuzzing")
    parser.add_argument("--server-args", default="", help="extra `phasewatch serve` flags")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the server (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    server = ServerProcess("full", args=args.server_args.split(),
                           env=dict(item.split("=", 1) for item in args.server_env))
    result: dict[str, Any] = {}
    try:
        rss_start = server.rss_mib()
        started = time.perf_counter()
        if args.garbage:
            codes = asyncio.run(garbage(server.target, args.garbage, args.concurrency))
            rss_warm = rss_start
        else:
            samples: dict[int, float] = {}
            kinds: list[dict[str, Any]] = []

            def sample(done: int) -> None:
                samples[done] = server.rss_mib()
                if done % max(1, args.calls // 10) == 0:
                    kinds.append({"calls": done, **memory_of(server.process.pid)})
                if done % max(1, args.calls // 10) == 0:
                    print(f"{done} calls, RSS {samples[done]:.0f} MiB, "
                          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

            codes = asyncio.run(fuzz(server.target, args.calls, seed=args.seed,
                                     concurrency=args.concurrency, on_progress=sample))
            cut = int(args.calls * args.warmup)
            warm = [v for k, v in sorted(samples.items()) if k <= cut]
            rss_warm = warm[-1] if warm else rss_start
            flat = [v for k, v in samples.items() if k > cut]
            result["warmup_calls"] = cut
            result["rss_max_after_warmup_mib"] = round(max(flat, default=rss_warm), 1)
            result["rss_min_after_warmup_mib"] = round(min(flat, default=rss_warm), 1)
            result["rss_mib_every_10pct"] = [round(v, 1) for k, v in sorted(samples.items())
                                             if k % max(1, args.calls // 10) == 0]
            result["memory_by_kind_every_10pct"] = kinds
        elapsed = time.perf_counter() - started
        rss_end = server.rss_mib()
        log_lines = len(server.log)
        tracebacks = sum("Traceback" in line for line in server.log)
    finally:
        server.process.terminate()
        server.process.wait(30)
    internal = sum(v for k, v in codes.items() if k in ("INTERNAL", "UNKNOWN"))
    result = {
        **result,
        "calls": sum(v for k, v in codes.items() if not k.startswith(("!", "?"))),
        "note": "INTERNAL/UNKNOWN are the server's; see codes for the '!' details",
        "codes": dict(sorted(codes.items())),
        "internal": internal,
        "calls_per_second": round(sum(codes.values()) / elapsed, 1),
        "rss_start_mib": round(rss_start, 1),
        "rss_after_warmup_mib": round(rss_warm, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_change_after_warmup_pct": round(100 * (rss_end - rss_warm) / rss_warm, 1),
        "server_log_lines_kept": log_lines,
        "server_tracebacks_in_kept_log": tracebacks,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if internal == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Train a model that groks (modular addition, AdamW, weight decay 1) and stream it to a detector.

A plain PyTorch loop on the CPU (one thread, a few minutes at most) with the
three lines of the client SDK and a :class:`~detector.probe.SpectralProbe`;
the detector's events are printed as they arrive::

    phasewatch serve &                                   # or: --embedded
    python examples/grokking_stream.py --target 127.0.0.1:50051
    python examples/grokking_stream.py --embedded        # a detector in this process

The model, data and optimiser are those of the ``grok_add`` scenario of
``make_runs.py`` (imported from beside this file): p = 59, both operands
embedded (59 x 64), a ReLU layer of 256, AdamW lr 3e-3, betas (0.9, 0.98),
weight decay 1.0, full batch, 40 % of the pairs for training. It memorises
within ~100 steps and generalises thousands of steps later; the run stops
``--after-grok`` steps after test accuracy reaches 0.95.

Every ``--log-every`` steps it logs ``train_loss``, ``test_loss``,
``train_acc``, ``test_acc``, ``grad_norm`` and ``lr``, and the probe logs
the model's ``weight_norm`` and, for the embedding ``emb`` and the hidden
layer ``l1``, ``effective_rank``, ``alpha_req``, ``cos_stability`` (on 512
fixed pairs) and the weight's ``weight_stable_rank``, ``weight_top_sv1`` and
``weight_norm``. Needs the ``torch`` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_runs  # noqa: E402  (beside this file)

QUIET_KINDS = frozenset({"CHANGE_POINT", "PLATEAU_START", "PLATEAU_END"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--target", default="127.0.0.1:50051", help="detector HOST:PORT")
    where.add_argument("--embedded", action="store_true", help="start a detector in this process")
    parser.add_argument("--run-id", default=None, help="default grok-add-<seed>-<time>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=9000)
    parser.add_argument("--after-grok", type=int, default=1500,
                        help="steps to go on after test accuracy reaches 0.95")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--stop-on-collapse", action="store_true")
    parser.add_argument("--all-events", action="store_true",
                        help="print every event (default: phase, grokking, collapse, spike and "
                             "hidden-progress events; change points and plateaus are only counted)")
    args = parser.parse_args(argv)

    make_runs.limit_native_threads(args.threads)  # before numpy/torch start their pools
    import torch

    from detector.client import Event, connect
    from detector.probe import SpectralProbe

    torch.set_num_threads(args.threads)
    server = None
    target = args.target
    if args.embedded:
        from detector.engine import Engine
        from detector.server import create_server

        server, port = create_server(Engine(), "127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        print(f"detector: in-process on {target}")

    config = dict(make_runs.SCENARIOS["grok_add"].config)
    task = make_runs.TASKS[config["task"]](config, args.seed)
    model = task.model
    loss_fn = make_runs._loss_fn(config["loss"], task.num_classes)
    opt = make_runs._optimizer(config, model.parameters())
    probe = SpectralProbe(
        model,
        layers=["emb", "l1"],
        batch=task.probe,
        every=args.probe_every,
        metrics={"effective_rank", "alpha_req", "cos_stability", "weight_stable_rank",
                 "weight_top_sv", "weight_norm", "model_weight_norm"},
    )
    t0 = time.monotonic()
    counts: dict[str, int] = {}

    def show(event: Event) -> None:
        counts[event.kind] = counts.get(event.kind, 0) + 1
        if not args.all_events and event.kind in QUIET_KINDS:
            return
        phase = f" -> {event.phase}" if event.phase else ""
        print(
            f"  [{time.monotonic() - t0:6.1f}s] EVENT {event.kind:<18} step {event.step:>5} "
            f"{event.series:<22}{phase} ({event.confidence:.2f}) {event.message}",
            flush=True,
        )

    run_id = args.run_id or f"grok-add-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"run {run_id}: streaming to {target}; modular addition p={config['p']}, AdamW wd=1.0")
    grok_step = None
    stopped = ""
    with connect(target, run_id, labels={"example": "grokking_stream", "task": "modadd"},
                 series=probe.series_specs(), on_event=show) as run:
        step = 0
        while True:
            opt.zero_grad(set_to_none=True)
            out = model(task.x_train)
            loss = loss_fn(out, task.y_train)
            loss.backward()
            if step % args.log_every == 0:
                with torch.no_grad():
                    test_out = model(task.x_test)
                    row = {
                        "train_loss": loss.item(),
                        "test_loss": loss_fn(test_out, task.y_test).item(),
                        "train_acc": (out.argmax(1) == task.y_train).float().mean().item(),
                        "test_acc": (test_out.argmax(1) == task.y_test).float().mean().item(),
                        "grad_norm": torch.sqrt(sum((p.grad.double() ** 2).sum()
                                                    for p in model.parameters())).item(),
                        "lr": opt.param_groups[0]["lr"],
                    }
                run.log(step, row)
                if step % 500 == 0:
                    print(f"step {step:>5}  train_loss {row['train_loss']:.4f}  train_acc "
                          f"{row['train_acc']:.3f}  test_acc {row['test_acc']:.3f}  "
                          f"({time.monotonic() - t0:.0f}s)", flush=True)
                if grok_step is None and row["test_acc"] >= make_runs.GROK_ACC:
                    grok_step = step
                    print(f"step {step:>5}  test accuracy reached {row['test_acc']:.3f}", flush=True)
            probe.log(run, step)
            if args.stop_on_collapse and any(e.kind == "COLLAPSE_ONSET" for e in run.poll_events()):
                stopped = "collapse"
                break
            if step >= args.max_steps or (grok_step is not None and step >= grok_step + args.after_grok):
                break
            opt.step()
            step += 1
    stats = run.stats
    print(
        f"done: {step} steps in {time.monotonic() - t0:.1f}s{' (stopped on collapse)' if stopped else ''}; "
        f"points logged {stats.logged}, acknowledged {stats.acknowledged}, dropped {stats.dropped}, "
        f"events {stats.events}; test accuracy >= 0.95 at step {grok_step}"
    )
    print("events by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if server is not None:
        server.stop(1).wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Probes: run kinds the labelled corpora lack, with the answer known by construction.

Each probe is a seeded synthetic run whose shape a reader judges at a glance;
the probe says what the detector reports at the point that matters, analysed
as ``phasewatch analyze`` does (:func:`detector.analysis.analyze_columns`,
default configuration). They are measurements, not tests: they print what the
detector does today (known misses included) so that a change shows up in the
numbers.

- ``lm_bump``: a loss-only language-model run (``loss`` every line, ``eval_loss``
  every 500 steps, ``learning_rate``): warm-up decay from 10.7 nats, a plateau
  near 4.1 from step ~1 200, a sigmoid drop of 1 nat centred at step 3 000
  (half-width ~300 steps; an induction-head-like bump), then a slow decline
  over 20 000 steps; log-normal noise of 3 % a line, logged every 1, 10 and 50
  steps. Reported: a ``CHANGE_POINT`` on ``loss`` located within 300 steps of the
  drop's centre (``cp``), when it was raised (``delay``: detected_at − 3 000),
  where the last ``PLATEAU_START`` on ``loss`` before it is located (``plateau
  from``) and where a ``PLATEAU_END`` within -300..+600 steps of the drop is
  (``ended``), and whether a plateau is still open through the drop (``plateau
  through``: a plateau that the drop did not end). A reader draws a
  line at the drop and ends the plateau there (DESIGN.md: "a loss plateau ends
  in a sudden drop" is abstraction).
- ``never_fits``: a classifier whose training accuracy levels off at 0.90
  (label noise: it never reaches ``fitted_accuracy``) and whose validation
  accuracy rises to 0.80 by step ~6 000 and stays there (noise 0.004) to step
  30 000, logged every 100 steps; and the same run without its training
  accuracy (a Hugging Face Trainer logs ``loss``, ``eval_loss`` and
  ``eval_accuracy``: only the training loss says the model has stopped
  fitting). Reported: the start of a ``stabilization`` segment, if any
  (``stable from``). A reader calls it stable from ~6 000-8 000.
- ``finetune``: a pre-trained classifier fine-tuned as a Hugging Face Trainer
  logs it: ``loss`` every 10 steps (minibatch noise 8 %), falling from 0.70 to
  0.25 (time constant 600 steps); ``eval_loss`` and ``eval_accuracy`` every 200
  steps, the accuracy 0.86 at the first evaluation and 0.91 from ~2 000 on;
  ``learning_rate`` decaying linearly; 6 000 steps. Reported: where abstraction
  and stabilization begin (a reader: improving from the start, stable from
  ~2 000-3 000).

Usage (from the repository root)::

    python -m benchmarks.probes [--seeds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from detector.analysis import analyze_columns  # noqa: E402

Columns = dict[str, tuple[np.ndarray, np.ndarray]]
BUMP_AT = 3000  # the drop's centre in lm_bump
BUMP_NEAR = 300  # a change point located this close to it is the drop's


def _lm_curve(t: np.ndarray, floor: float) -> np.ndarray:
    """Warm-up decay, plateau, the drop at BUMP_AT, a slow decline (nats)."""
    return (6.5 * np.exp(-t / 300) + floor - 1.0 / (1 + np.exp(-(t - BUMP_AT) / 150))
            - 0.5 * (1 - np.exp(-t / 8000)))


def lm_bump(seed: int, every: int) -> Columns:
    """The ``lm_bump`` run logged every ``every`` steps (see the module docstring)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 20001, every, dtype=np.int64)
    t = steps.astype(float)
    loss = _lm_curve(t, 4.2) * np.exp(rng.normal(0, 0.03, len(t)))
    evals = steps[steps % 500 == 0]
    te = evals.astype(float)
    eval_curve = _lm_curve(te, 4.25)
    lr = 3e-4 * np.minimum(1.0, t / 500) * 0.5 * (1 + np.cos(np.pi * t / 20000))
    return {"loss": (steps, loss), "eval_loss": (evals, eval_curve * np.exp(rng.normal(0, 0.005, len(te)))),
            "learning_rate": (steps, lr)}


def never_fits(seed: int) -> Columns:
    """The ``never_fits`` run (see the module docstring)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 30001, 100, dtype=np.int64)
    t = steps.astype(float)
    train_acc = np.clip(0.9 - 0.8 * np.exp(-t / 1500) + rng.normal(0, 0.004, len(t)), 0, 1)
    val_acc = np.clip(0.8 - 0.7 * np.exp(-t / 1500) + rng.normal(0, 0.004, len(t)), 0, 1)
    train_loss = 0.35 + 1.9 * np.exp(-t / 1500) * np.exp(rng.normal(0, 0.02, len(t)))
    val_loss = 0.55 + 1.75 * np.exp(-t / 1500) * np.exp(rng.normal(0, 0.01, len(t)))
    return {"train_loss": (steps, train_loss), "train_acc": (steps, train_acc),
            "val_loss": (steps, val_loss), "val_acc": (steps, val_acc)}


def finetune(seed: int) -> Columns:
    """The ``finetune`` run (see the module docstring)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 6001, 10, dtype=np.int64)
    t = steps.astype(float)
    loss = (0.25 + 0.45 * np.exp(-t / 600)) * np.exp(rng.normal(0, 0.08, len(t)))
    evals = np.arange(200, 6001, 200, dtype=np.int64)
    te = evals.astype(float)
    accuracy = 0.91 - 0.05 * np.exp(-(te - 200) / 500) + rng.normal(0, 0.003, len(te))
    eval_loss = 0.30 + 0.15 * np.exp(-(te - 200) / 500) + rng.normal(0, 0.003, len(te))
    return {"loss": (steps, loss), "eval_loss": (evals, eval_loss), "eval_accuracy": (evals, accuracy),
            "learning_rate": (steps, 2e-5 * (1 - t / 6000))}


def probe_finetune(seed: int) -> dict:
    segments, _, _ = analyze_columns(finetune(seed), run_id=f"finetune-{seed}")
    first = {}
    for s in segments:
        first.setdefault(s["phase"], s["start_step"])
    return {"abstraction_from": first.get("abstraction"), "stable_from": first.get("stabilization")}


def probe_bump(seed: int, every: int) -> dict:
    _, events, _ = analyze_columns(lm_bump(seed, every), run_id=f"lm_bump-{seed}-c{every}")
    cps = [e for e in events if e["kind"] == "CHANGE_POINT" and e["series"] == "loss"
           and abs(e["step"] - BUMP_AT) <= BUMP_NEAR]
    plateaus = sorted((e["step"], e["kind"]) for e in events
                      if e["series"] == "loss" and e["kind"] in ("PLATEAU_START", "PLATEAU_END"))
    open_at = None
    for step, kind in plateaus:
        if step > BUMP_AT + BUMP_NEAR:
            break
        open_at = step if kind == "PLATEAU_START" else None
    ends = [step for step, kind in plateaus
            if kind == "PLATEAU_END" and BUMP_AT - BUMP_NEAR <= step <= BUMP_AT + 2 * BUMP_NEAR]
    through = open_at is not None and not ends
    return {"cp": cps[0]["step"] if cps else None,
            "delay": int(cps[0]["evidence"]["detected_at_step"]) - BUMP_AT if cps else None,
            "plateau_through": through,
            "plateau_open_from": max((step for step, kind in plateaus
                                      if kind == "PLATEAU_START" and step <= BUMP_AT), default=None),
            "plateau_ended": ends[0] if ends else None,
            "loss_change_points": sum(e["kind"] == "CHANGE_POINT" and e["series"] == "loss" for e in events)}


def probe_never_fits(seed: int, train_acc: bool = True) -> dict:
    columns = never_fits(seed)
    if not train_acc:
        del columns["train_acc"]
    segments, _, _ = analyze_columns(columns, run_id=f"never_fits-{seed}")
    stable = [s["start_step"] for s in segments if s["phase"] == "stabilization"]
    return {"stable_from": stable[0] if stable else None}


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict[str, list[dict]] = {"lm_bump": [], "never_fits": [], "finetune": []}
    print(f"lm_bump: change point on loss within {BUMP_NEAR} steps of the drop at {BUMP_AT}")
    print(f"  {'seed':>4s} {'every':>5s} {'cp':>6s} {'delay':>6s} {'plateau from':>13s} {'ended':>6s} "
          f"{'plateau through':>16s} {'loss CPs':>9s}")
    for seed in range(args.seeds):
        for every in (1, 10, 50):
            row = {"seed": seed, "every": every, **probe_bump(seed, every)}
            out["lm_bump"].append(row)
            print(f"  {seed:4d} {every:5d} {_fmt(row['cp']):>6s} {_fmt(row['delay']):>6s} "
                  f"{_fmt(row['plateau_open_from']):>13s} {_fmt(row['plateau_ended']):>6s} "
                  f"{'yes' if row['plateau_through'] else 'no':>16s} {row['loss_change_points']:9d}")
    rows = out["lm_bump"]
    print(f"  found {sum(r['cp'] is not None for r in rows)}/{len(rows)}; "
          f"a plateau open through the drop {sum(r['plateau_through'] for r in rows)}/{len(rows)}")
    print("never_fits: stabilization segment (a reader: from ~6000-8000)")
    print(f"  {'seed':>4s} {'with train_acc':>15s} {'loss only':>10s}")
    for seed in range(args.seeds):
        row = {"seed": seed, **probe_never_fits(seed),
               "stable_from_without_train_acc": probe_never_fits(seed, train_acc=False)["stable_from"]}
        out["never_fits"].append(row)
        without = _fmt(row["stable_from_without_train_acc"])
        print(f"  {seed:4d} {_fmt(row['stable_from']):>15s} {without:>10s}")
    rows = out["never_fits"]
    print(f"  stabilised {sum(r['stable_from'] is not None for r in rows)}/{args.seeds} with the training "
          f"accuracy, {sum(r['stable_from_without_train_acc'] is not None for r in rows)}/{args.seeds} "
          "without it")
    print("finetune: phases of a pre-trained classifier's fine-tune (a reader: abstraction from the start, "
          "stable from ~2000-3000)")
    for seed in range(args.seeds):
        row = {"seed": seed, **probe_finetune(seed)}
        out["finetune"].append(row)
        print(f"  {seed:4d} abstraction from {_fmt(row['abstraction_from']):>5s}, "
              f"stabilization from {_fmt(row['stable_from'])}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

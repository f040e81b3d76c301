"""The log readers on files written by the real libraries: TensorBoard's writer
(through torch's ``SummaryWriter``), Lightning's ``CSVLogger`` and the Hugging
Face Trainer; plus W&B-style JSON Lines and detection by content."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector.cli import main
from detector.errors import LogFileError
from detector.logfile import detect_format, read_growing_log, read_log, write_jsonl


def _read(path: Path | str) -> tuple[dict[str, tuple[list[int], list[float]]], list[str]]:
    notes: list[str] = []
    columns = read_log(path, warn=notes.append)
    return {k: (s.tolist(), v.tolist()) for k, (s, v) in columns.items()}, notes


# --- TensorBoard -----------------------------------------------------------


def _write_tensorboard(log_dir: Path, steps: int = 30) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for step in range(steps):
        writer.add_scalar("train/loss", 2.0 / (step + 1), step)
        # A tensor scalar with the scalars plugin's metadata, as tf.summary.scalar writes.
        writer.add_scalar("tensor/lr", 0.1 * (step + 1), step, new_style=True)
        if step % 10 == 9:
            writer.add_scalar("val/acc", step / 100, step)
            writer.add_scalars("acc", {"train": step / 50, "val": step / 100}, step)
    writer.add_histogram("weights", torch.arange(10.0), 0)
    writer.add_scalar("train/loss", math.nan, steps)  # divergence is data
    writer.close()


def test_tensorboard_directory_written_by_summary_writer(tmp_path: Path) -> None:
    _write_tensorboard(tmp_path / "tb")
    columns, notes = _read(tmp_path / "tb")
    assert set(columns) == {"train/loss", "tensor/lr", "val/acc", "acc_train/acc", "acc_val/acc"}
    assert columns["tensor/lr"] == (list(range(30)), pytest.approx([0.1 * (i + 1) for i in range(30)]))
    steps, values = columns["train/loss"]
    assert steps == list(range(31))
    assert values[:3] == pytest.approx([2.0, 1.0, 2 / 3]) and math.isnan(values[-1])
    assert columns["val/acc"] == ([9, 19, 29], pytest.approx([0.09, 0.19, 0.29]))
    assert columns["acc_train/acc"][1] == pytest.approx([0.18, 0.38, 0.58])
    assert any("non-scalar" in n and "weights" in n for n in notes)
    assert detect_format(str(tmp_path / "tb")) == "tensorboard"


def test_an_event_file_is_found_by_content_not_name(tmp_path: Path) -> None:
    _write_tensorboard(tmp_path / "tb", steps=5)
    event_file = next((tmp_path / "tb").glob("events.out.tfevents.*"))
    renamed = tmp_path / "scalars.log"
    shutil.copy(event_file, renamed)
    assert detect_format(str(renamed)) == "tensorboard"
    columns, _ = _read(renamed)
    assert set(columns) == {"train/loss", "tensor/lr"}  # add_scalars tags live in subfolders
    assert columns["train/loss"][0] == [0, 1, 2, 3, 4, 5]
    # A record cut half-way (a writer still at it) is read up to the last whole record.
    cut = tmp_path / "cut.tfevents"
    cut.write_bytes(event_file.read_bytes()[:-7])
    assert read_growing_log(cut)["train/loss"][0].tolist() == [0, 1, 2, 3, 4]


def test_analyze_reads_a_tensorboard_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_tensorboard(tmp_path / "tb")
    assert main(["analyze", str(tmp_path / "tb"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document["change_points"]) == {
        "train/loss", "tensor/lr", "val/acc", "acc_train/acc", "acc_val/acc"
    }


# --- Lightning CSVLogger ---------------------------------------------------


def test_lightning_csv_logger_metrics(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: tuple, _: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: tuple, _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = lightning.Trainer(
        max_epochs=3, logger=CSVLogger(str(tmp_path / "logs")), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", num_sanity_val_steps=0,
    )
    trainer.fit(Tiny(), loader, loader)
    metrics = next((tmp_path / "logs").rglob("metrics.csv"))
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    expected_train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"]]
    expected_val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    assert len(expected_train) == 12 and len(expected_val) == 3  # sparse rows, as written
    for path in (metrics, tmp_path / "logs"):  # the file, or the logger's folder
        columns, _ = _read(path)
        assert set(columns) == {"train_loss", "val_loss"}  # epoch is a counter
        for name, expected in (("train_loss", expected_train), ("val_loss", expected_val)):
            assert columns[name][0] == [step for step, _ in expected]
            assert columns[name][1] == pytest.approx([value for _, value in expected])


# --- Hugging Face Trainer --------------------------------------------------


def test_hugging_face_trainer_state(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config)
    examples = [
        {"input_ids": torch.randint(0, 32, (8,)), "labels": torch.randint(0, 32, (8,))}
        for _ in range(16)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
        logging_steps=1, eval_strategy="steps", eval_steps=3, save_strategy="steps",
        save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=examples, eval_dataset=examples[:4]
    )
    trainer.train()
    state = tmp_path / "out" / "checkpoint-6" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    assert detect_format(str(state)) == "trainer_state"
    columns, notes = _read(tmp_path / "out")  # two checkpoints: the newest history is read
    assert columns["loss"][0] == list(range(1, 7))
    assert columns["loss"][1] == pytest.approx([h["loss"] for h in history if "loss" in h])
    assert columns["eval_loss"][0] == [3, 6]
    assert {"learning_rate", "grad_norm"} <= set(columns)
    assert not {n for n in columns if n.endswith(("runtime", "per_second"))}
    assert any("timing keys" in n for n in notes)
    # The summary entry the Trainer appends at the end (train_runtime, ...) is not read.
    final = dict(json.loads(state.read_text()))
    final["log_history"] = [*history, {"step": 6, "train_runtime": 1.0, "train_loss": 3.0}]
    state.write_text(json.dumps(final, indent=2))
    columns, notes = _read(state)
    assert "train_loss" not in columns and any("summary" in n for n in notes)


def test_trainer_state_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": [{"step": 1, "loss": 1.0}, {"loss": 2.0}]}, indent=1))
    with pytest.raises(LogFileError, match=r"log_history\[1\]: no \"step\""):
        read_log(path)


# --- JSON Lines and CSV step keys ------------------------------------------


def test_wandb_style_jsonl_with_step_underscore(tmp_path: Path) -> None:
    path = tmp_path / "history.log"
    write_jsonl(path, [
        {"_step": i, "_runtime": 0.5 * i, "_timestamp": 1.7e9 + i, "train/loss": 1 / (i + 1)}
        for i in range(5)
    ])
    columns, _ = _read(path)
    assert set(columns) == {"train/loss"}
    assert columns["train/loss"][0] == [0, 1, 2, 3, 4]


def test_global_step_column_and_no_step_at_all(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_text("global_step,epoch,loss\n0,0,1.0\n5,0,0.5\n")
    assert _read(path)[0] == {"loss": ([0, 5], [1.0, 0.5])}
    bad = tmp_path / "run.jsonl"
    bad.write_text('{"loss": 1.0}\n')
    with pytest.raises(LogFileError, match=r'run.jsonl:1: no "step" in this record \(nor global_step'):
        read_log(bad)


def test_a_directory_without_a_log_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "hparams.yaml").write_text("lr: 0.1\n")
    with pytest.raises(LogFileError, match="no TensorBoard event files and no log file"):
        read_log(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [{"step": 0, "x": 1.0}])
    with pytest.raises(LogFileError, match=r"several log files here \(a.jsonl, b.jsonl\)"):
        read_log(tmp_path)


def test_a_growing_log_is_read_up_to_its_last_whole_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    assert read_growing_log(path)["a"][0].tolist() == [0, 1]
    csv_path = tmp_path / "run.csv"
    csv_path.write_text("step,a\n0,1\n1,2\n2,3")
    assert read_growing_log(csv_path)["a"][0].tolist() == [0, 1]
    assert np.array_equal(read_log(csv_path)["a"][0], [0, 1, 2])


def test_cli_names_the_file_for_a_missing_directory_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkdir(tmp_path / "empty")
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phasewatch: {tmp_path / 'empty'}: no TensorBoard") and "Traceback" not in err


def test_a_tensorboard_log_is_read_incrementally(tmp_path: Path) -> None:
    _write_tensorboard(tmp_path / "tb", steps=5)
    event_file = next((tmp_path / "tb").glob("events.out.tfevents.*"))
    data = event_file.read_bytes()
    growing = tmp_path / "growing" / event_file.name
    growing.parent.mkdir()
    growing.write_bytes(data[:-7])  # the last record half-written
    cache: dict = {}
    assert read_growing_log(growing.parent, cache=cache)["train/loss"][0].tolist() == [0, 1, 2, 3, 4]
    with growing.open("ab") as out:
        out.write(data[-7:])  # the writer finishes it: the same loader picks it up
    again = read_growing_log(growing.parent, cache=cache)
    assert again["train/loss"][0].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.isnan(again["train/loss"][1][-1])

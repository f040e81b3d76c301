"""SpectralProbe, the Lightning and Hugging Face callbacks: real training against a real detector.

Each test trains a tiny model on the CPU for a few dozen steps and streams it
to a gRPC server in this process (the real servicer and engine); the engine
records every point it is given. Without a detector, training must still run
to the end, and quickly. Needs torch (and Lightning / transformers for their
tests): CI installs them (``.ci/run``); elsewhere the tests are skipped.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: pip install torch, then -e '.[lightning,huggingface]' "
    "(.ci/run installs the CPU wheel)")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from detector import spectral  # noqa: E402
from detector.client import ClientConfig, connect  # noqa: E402
from detector.core.types import Event as CoreEvent  # noqa: E402
from detector.core.types import EventKind, Phase  # noqa: E402
from detector.engine import Engine  # noqa: E402
from detector.probe import SpectralProbe  # noqa: E402
from detector.server import create_server  # noqa: E402

NO_LIGHTNING = "Lightning is not installed: pip install -e '.[lightning]'"
NO_TRANSFORMERS = "transformers is not installed: pip install -e '.[huggingface]'"

FAST = ClientConfig(
    batch_points=256,
    flush_interval=0.02,
    reconnect_initial_backoff=0.02,
    reconnect_max_backoff=0.2,
    close_timeout=10.0,
    exit_timeout=0.5,
)
NO_WAIT = ClientConfig(flush_interval=0.02, close_timeout=0.3, exit_timeout=0.1)


class RecordingEngine(Engine):
    """The real engine, also recording every point it was given: {run: {series: {step: value}}}."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.points: dict[str, dict[str, dict[int, float]]] = {}
        self._record_lock = threading.Lock()

    def ingest(self, run_id: str, columns: Any) -> Any:
        result = super().ingest(run_id, columns)
        with self._record_lock:
            run = self.points.setdefault(run_id, {})
            for name, (steps, values) in columns.items():
                series = run.setdefault(name, {})
                for s, v in zip(steps, values, strict=True):
                    series.setdefault(int(s), float(v))
        return result

    def series(self, run_id: str) -> dict[str, dict[int, float]]:
        with self._record_lock:
            return {k: dict(v) for k, v in self.points.get(run_id, {}).items()}


class CollapseEngine(RecordingEngine):
    """Also reports COLLAPSE_ONSET, once per run, in answer to the first batch reaching step 10."""

    evidence: dict[str, str] = {"test": "stand-in"}  # no scope: a training collapse

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.collapsed: set[str] = set()

    def ingest(self, run_id: str, columns: Any) -> Any:
        result = super().ingest(run_id, columns)
        top = max((int(max(steps)) for steps, _ in columns.values() if len(steps)), default=-1)
        if top < 10 or run_id in self.collapsed:
            return result
        self.collapsed.add(run_id)
        event = CoreEvent(
            step=top,
            kind=EventKind.COLLAPSE_ONSET,
            detected_at=top,
            series="val_acc" if self.evidence.get("scope") == "generalization" else "loss",
            confidence=0.99,
            message="test collapse",
            phase=Phase.COLLAPSE,
            evidence=dict(self.evidence),
        )
        return dataclasses.replace(result, events=(*result.events, event))


class GeneralizationCollapseEngine(CollapseEngine):
    """Reports a generalisation collapse instead: it must not stop training."""

    evidence = {"test": "stand-in", "scope": "generalization"}


class Server:
    def __init__(self, engine: RecordingEngine) -> None:
        self.engine = engine
        self.server, port = create_server(engine, "127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"


@pytest.fixture
def detector() -> Iterator[Server]:
    server = Server(RecordingEngine())
    yield server
    server.server.stop(0).wait(5)


@pytest.fixture
def collapse_detector() -> Iterator[Server]:
    server = Server(CollapseEngine())
    yield server
    server.server.stop(0).wait(5)


@pytest.fixture
def generalization_collapse_detector() -> Iterator[Server]:
    server = Server(GeneralizationCollapseEngine())
    yield server
    server.server.stop(0).wait(5)


@pytest.fixture
def dead_target() -> Iterator[str]:
    """An address nobody listens on: bound but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def _data(n: int = 64) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


# --- torch wrappers and the probe ---------------------------------------------------------


def test_torch_wrappers_match_numpy() -> None:
    from detector import probe as P

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(100, 20, generator=gen) * torch.linspace(1.0, 0.1, 20)
    w = torch.randn(16, 20, generator=gen)
    hn, wn = h.double().numpy(), w.double().numpy()
    assert P.effective_rank(h) == pytest.approx(spectral.effective_rank(hn), rel=1e-6)
    assert P.rankme(h) == pytest.approx(spectral.rankme(hn), rel=1e-6)
    assert P.alpha_req(h) == pytest.approx(spectral.alpha_req(hn), rel=1e-6)
    assert P.lambda_min(h) == pytest.approx(spectral.lambda_min(hn), rel=1e-6)
    assert P.stable_rank(w) == pytest.approx(spectral.stable_rank(wn), rel=1e-6)
    assert P.top_singular_values(w, 2) == pytest.approx(spectral.top_singular_values(wn, 2).tolist())
    assert P.weight_norm(w) == pytest.approx(float(np.linalg.norm(wn)))
    assert P.cosine_stability(h, h * 2) == pytest.approx(1.0)
    assert math.isnan(P.effective_rank(torch.tensor([[1.0, float("nan")]])))


def test_probe_in_a_plain_loop_streams_per_layer_values(detector: Server) -> None:
    model = _mlp()
    x, y = _data()
    probe = SpectralProbe(model, layers=["0", "1"], batch=x[:48], every=5, top_k=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with connect(detector.target, "plain-loop", series=probe.series_specs(), config=FAST) as run:
        for step in range(31):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            run.log(step, train_loss=loss.item())
            probe.log(run, step)
        assert model.training  # the probe's eval pass restored the mode
        assert not any(m._forward_hooks for m in model.modules())  # and removed its hooks
    assert run.stats.acknowledged == run.stats.logged > 0
    got = detector.engine.series("plain-loop")
    assert sorted(got["train_loss"]) == list(range(31))
    probe_steps = [0, 5, 10, 15, 20, 25, 30]
    for name in ("0.effective_rank", "0.rankme", "0.alpha_req", "0.lambda_min", "0.top_sv2",
                 "0.weight_stable_rank", "0.weight_top_sv1", "0.weight_norm", "1.effective_rank",
                 "weight_norm"):
        assert sorted(got[name]) == probe_steps, name
    for name in ("0.cos_stability", "0.effrank_delta", "1.cos_stability"):
        assert sorted(got[name]) == probe_steps[1:], name  # from the second probe on
    assert "1.weight_norm" not in got  # ReLU has no weight
    # The logged values are the numpy metrics of the layer's output on the probe batch.
    with torch.no_grad():
        h = model[0](x[:48]).double().numpy()
    assert got["0.effective_rank"][30] == pytest.approx(spectral.effective_rank(h), rel=1e-9)
    assert 0.9 < got["0.cos_stability"][30] <= 1.0 + 1e-9
    assert got["weight_norm"][30] == pytest.approx(
        math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters())), rel=1e-9
    )


def test_probe_failures_never_reach_the_training_loop(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Any) -> Any:
            raise RuntimeError("boom")

    model = Broken()
    probe = SpectralProbe(model, layers=["lin"], batch=torch.zeros(2, 4), every=1)
    assert probe.log(None, 0) is None and probe.log(None, 1) is None
    assert probe.failures == 2
    assert sum("probe failed" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert model.training and not model.lin._forward_hooks
    with pytest.raises(ValueError, match="no submodules"):
        SpectralProbe(model, layers=["nope"], batch=torch.zeros(2, 4))


def test_probe_handles_sequence_outputs_and_declares_roles() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.rnn = nn.GRU(6, 5, batch_first=True)

        def forward(self, tokens: Any) -> Any:
            out, _ = self.rnn(self.emb(tokens))
            return out

    torch.manual_seed(0)
    model = Seq()
    probe = SpectralProbe(model, layers={"val_rnn": model.rnn, "emb": model.emb},
                          batch=torch.randint(0, 10, (12, 7)), every=1)
    values = probe.compute()
    assert values["val_rnn.effective_rank"] <= 5.0 + 1e-9  # (12, 7, 5) averaged over tokens
    assert "val_rnn.weight_norm" not in values  # a GRU has no single `weight`
    assert values["emb.weight_stable_rank"] >= 1.0
    specs = {s["name"]: s for s in probe.series_specs()}
    assert set(values) <= set(specs)
    # The layer name says "val", but probe metrics are declared as train-split series.
    assert specs["val_rnn.effective_rank"] == {"name": "val_rnn.effective_rank", "role": "rank",
                                               "split": "train"}
    assert specs["emb.cos_stability"]["role"] == "stability"
    assert specs["emb.effrank_delta"]["role"] == "other"


# --- Lightning ----------------------------------------------------------------------------


def _lightning_module(delay: float = 0.0) -> Any:
    L = pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            if delay:
                time.sleep(delay)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))
            self.log("val_acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.2)

    return Tiny()


def _lightning_fit(callback: Any, max_epochs: int = 5, delay: float = 0.0) -> Any:
    L = pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(_lightning_module(delay), loader, DataLoader(TensorDataset(x, y), batch_size=64))
    return trainer


def test_lightning_callback_streams_logged_metrics_and_probe(detector: Server) -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    x, _ = _data()
    callback = PhasewatchCallback(detector.target, "lightning-run", config=FAST, every=1,
                                  probe_layers=["net.0"], probe_batch=x[:48], probe_every=5)
    trainer = _lightning_fit(callback)
    assert trainer.global_step == 20  # 5 epochs of 4 batches
    assert callback.run is None  # closed at the end
    got = detector.engine.series("lightning-run")
    assert sorted(got["train_loss"]) == list(range(1, 21))
    assert sorted(got["val_loss"]) == [4, 8, 12, 16, 20]  # once per validation, not repeated
    assert sorted(got["val_acc"])[0] == 4
    assert sorted(got["net.0.effective_rank"]) == [5, 10, 15, 20]
    assert sorted(got["net.0.weight_stable_rank"]) == [5, 10, 15, 20]
    assert callback.stop_event is None


def test_lightning_trains_to_the_end_without_a_detector(dead_target: str) -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    x, _ = _data()
    callback = PhasewatchCallback(dead_target, "lightning-down", config=NO_WAIT, close_timeout=0.3,
                                  probe_layers=["net.0"], probe_batch=x[:16], probe_every=2)
    t0 = time.monotonic()
    trainer = _lightning_fit(callback)
    assert trainer.global_step == 20
    assert time.monotonic() - t0 < 30


def test_lightning_disabled_by_the_environment_connects_nowhere(
    detector: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    monkeypatch.setenv("PHASEWATCH_TARGET", detector.target)
    monkeypatch.setenv("PHASEWATCH_DISABLED", "1")
    x, _ = _data()
    callback = PhasewatchCallback(run_id="lightning-off", config=FAST, every=1,
                                  probe_layers=["net.0"], probe_batch=x[:16], probe_every=1)
    trainer = _lightning_fit(callback, max_epochs=2)
    assert trainer.global_step == 8
    assert callback.session.probe is None and detector.engine.series("lightning-off") == {}
    monkeypatch.delenv("PHASEWATCH_DISABLED")
    callback = PhasewatchCallback(run_id="lightning-env", config=FAST, every=1)  # $PHASEWATCH_TARGET
    _lightning_fit(callback, max_epochs=2)
    assert sorted(detector.engine.series("lightning-env")["train_loss"]) == list(range(1, 9))


def test_lightning_stops_on_collapse(collapse_detector: Server) -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    seen: list[Any] = []
    callback = PhasewatchCallback(collapse_detector.target, "lightning-collapse", config=FAST,
                                  every=1, stop_on_collapse=True, on_event=seen.append)
    trainer = _lightning_fit(callback, max_epochs=300, delay=0.003)  # 1200 steps if it never stopped
    assert callback.stop_event is not None and callback.stop_event.kind == "COLLAPSE_ONSET"
    assert seen and seen[0].kind == "COLLAPSE_ONSET"
    assert 10 <= trainer.global_step < 600


def test_lightning_does_not_stop_on_a_generalization_collapse(
    generalization_collapse_detector: Server,
) -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    seen: list[Any] = []
    callback = PhasewatchCallback(generalization_collapse_detector.target, "lightning-gen",
                                  config=FAST, every=1, stop_on_collapse=True, on_event=seen.append)
    trainer = _lightning_fit(callback, max_epochs=10, delay=0.01)  # 40 steps, time to hear back
    assert trainer.global_step == 40  # trained to the end
    assert callback.stop_event is None and not callback.session.should_stop()
    onsets = [(e.kind, e.evidence.get("scope")) for e in seen if e.kind == "COLLAPSE_ONSET"]
    assert onsets == [("COLLAPSE_ONSET", "generalization")]  # it was reported, and ignored


def test_lightning_hooks_swallow_errors() -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    callback = PhasewatchCallback("127.0.0.1:1", "broken")
    callback.on_train_start(object(), object())  # no is_global_zero: opens the run anyway
    callback.on_train_batch_end(object(), None, None, None, 0)  # a trainer without global_step
    callback.session.close_timeout = 0.1
    callback.on_train_end(object(), None)
    assert callback.run is None
    with pytest.raises(ValueError):
        PhasewatchCallback("127.0.0.1:1", "has space")


# --- Hugging Face -------------------------------------------------------------------------


class _HFModel(nn.Module):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.net = _mlp()
        self.delay = delay

    def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
        logits = self.net(x)
        if self.delay and self.training:
            time.sleep(self.delay)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class _HFData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(callback: Any, tmp_path: Path, max_steps: int = 20, delay: float = 0.0) -> Any:
    transformers = pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=0.05,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=_HFModel(delay), args=args, train_dataset=_HFData(), eval_dataset=_HFData(),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def test_huggingface_callback_streams_logs_and_probe(detector: Server, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    from detector.integrations.huggingface import PhasewatchCallback

    x, _ = _data()
    callback = PhasewatchCallback(detector.target, "hf-run", config=FAST,
                                  probe_layers=["net.0"], probe_batch={"x": x[:48]}, probe_every=5)
    trainer = _hf_train(callback, tmp_path)
    assert trainer.state.global_step == 20
    assert callback.run is None
    got = detector.engine.series("hf-run")
    assert sorted(got["loss"]) == list(range(1, 21))
    assert sorted(got["eval_loss"]) == [5, 10, 15, 20]
    assert sorted(got["learning_rate"]) == list(range(1, 21))
    assert sorted(got["net.0.effective_rank"]) == [5, 10, 15, 20]
    assert not any(k.endswith(("_runtime", "_per_second")) or k in ("epoch", "total_flos", "train_loss")
                   for k in got)


def test_huggingface_trains_to_the_end_without_a_detector(dead_target: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    from detector.integrations.huggingface import PhasewatchCallback

    x, _ = _data()
    callback = PhasewatchCallback(dead_target, "hf-down", config=NO_WAIT, close_timeout=0.3,
                                  probe_layers=["net.0"], probe_batch={"x": x[:16]}, probe_every=2)
    t0 = time.monotonic()
    trainer = _hf_train(callback, tmp_path)
    assert trainer.state.global_step == 20
    assert time.monotonic() - t0 < 30


def test_huggingface_stops_on_collapse(collapse_detector: Server, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    from detector.integrations.huggingface import PhasewatchCallback

    callback = PhasewatchCallback(collapse_detector.target, "hf-collapse", config=FAST,
                                  stop_on_collapse=True)
    trainer = _hf_train(callback, tmp_path, max_steps=1200, delay=0.003)
    assert callback.stop_event is not None and callback.stop_event.kind == "COLLAPSE_ONSET"
    assert 10 <= trainer.state.global_step < 600


# --- Lightning: DDP, resume, Logger -------------------------------------------------------

DDP_SCRIPT = '''
import json, sys, time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as L

from detector.client import ClientConfig
from detector.integrations.lightning import PhasewatchCallback


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        time.sleep(0.005)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


target, out = sys.argv[1], Path(sys.argv[2])
g = torch.Generator().manual_seed(1)
x = torch.randn(64, 8, generator=g)
y = (x[:, 0] > 0).long()
callback = PhasewatchCallback(target, "ddp-collapse", every=2, stop_on_collapse=True,
                              config=ClientConfig(batch_points=64, flush_interval=0.02))
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=400, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback])
trainer.fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=16))
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
    {"step": trainer.global_step, "heard": callback.stop_event is not None}))
'''


def test_lightning_ddp_stops_every_rank_on_collapse(collapse_detector: Server, tmp_path: Path) -> None:
    """Two CPU processes under strategy="ddp" (gloo): rank 0 hears the collapse, both stop
    at the same step (a rank left training would hang the other in its next all-reduce)."""
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), collapse_detector.target, str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["heard"] and not ranks[1]["heard"]  # only rank 0 talks to the detector
    assert ranks[0]["step"] == ranks[1]["step"]
    assert 10 <= ranks[0]["step"] < 400  # 800 steps if it never stopped
    assert sorted(collapse_detector.engine.series("ddp-collapse")["train_loss"])[0] <= 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkpointing_fit(callback: Any, tmp_path: Path, max_epochs: int, ckpt: Path | None) -> Any:
    L = pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data()
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(_lightning_module(), DataLoader(TensorDataset(x, y), batch_size=16),
                ckpt_path=str(ckpt) if ckpt else None)
    return trainer


def test_lightning_resume_from_a_checkpoint_continues_the_run(detector: Server, tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from detector.integrations.lightning import PhasewatchCallback

    first = PhasewatchCallback(detector.target, config=FAST, every=1)  # a generated run id
    # Generated ids hold the time in seconds and the pid: another process's differs.
    first.session.run_id = "lightning-first-process"
    _checkpointing_fit(first, tmp_path, max_epochs=2, ckpt=None)
    second = PhasewatchCallback(detector.target, config=FAST, every=1)
    assert second.run_id != first.run_id
    trainer = _checkpointing_fit(second, tmp_path, max_epochs=4, ckpt=tmp_path / "last.ckpt")
    assert trainer.global_step == 16
    assert second.run_id == first.run_id  # restored from the checkpoint
    assert sorted(detector.engine.series(first.run_id)["train_loss"]) == list(range(1, 17))
    assert detector.engine.series(second.session.run_id) == detector.engine.series(first.run_id)
    # An explicit, different run id is the user's choice: it is kept, not resumed.
    third = PhasewatchCallback(detector.target, "chosen-id", config=FAST, every=1)
    third.load_state_dict({"run_id": first.run_id})
    assert third.run_id == "chosen-id" and not third.session.resume


def test_lightning_logger_streams_what_lightning_logs(detector: Server) -> None:
    L = pytest.importorskip("lightning.pytorch", reason=NO_LIGHTNING)
    from torch.utils.data import DataLoader, TensorDataset

    from detector.integrations.lightning import PhasewatchLogger

    x, y = _data()
    logger = PhasewatchLogger(detector.target, "logger-run", config=FAST)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(_lightning_module(), DataLoader(TensorDataset(x, y), batch_size=16),
                DataLoader(TensorDataset(x, y), batch_size=64))
    assert logger.experiment is None and logger.version == "logger-run"  # finalized
    got = detector.engine.series("logger-run")
    assert len(got["train_loss"]) == 12 and "val_acc" in got and "epoch" not in got

"""Shared fixtures: a real detector on port 0 and a real channel to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from detector.engine import Engine, EngineConfig, Store
from detector.server import EventBus, create_server

ServerFactory = Callable[..., tuple[Engine, int, grpc.Channel]]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Start servers with custom settings; all are stopped after the test.

    ``make_server(config=..., store=..., bus=..., max_message_bytes=...)``
    returns ``(engine, port, channel)``.
    """
    started: list[tuple[grpc.Server, grpc.Channel]] = []

    def factory(
        config: EngineConfig | None = None,
        store: Store | None = None,
        bus: EventBus | None = None,
        **server_options: object,
    ) -> tuple[Engine, int, grpc.Channel]:
        engine = Engine(config, store=store)
        server, port = create_server(engine, "127.0.0.1:0", bus=bus, **server_options)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return engine, port, channel

    yield factory
    for server, channel in started:
        channel.close()
        server.stop(None)


@pytest.fixture
def server(make_server: ServerFactory) -> tuple[Engine, int, grpc.Channel]:
    """A detector with default settings and no store: ``(engine, port, channel)``."""
    return make_server()

"""The server's policy for full garbage collections (detector.server.full_collections)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from detector.server.full_collections import FullCollections


class Node:
    """A container object that can be put in a reference cycle."""

    other: object = None


@pytest.fixture
def clock() -> Iterator[list[float]]:
    now = [0.0]
    yield now
    gc.unfreeze()  # the process's collector as it was (pytest's objects included)


def test_what_a_full_pass_keeps_is_frozen_and_a_cycle_in_it_waits_for_the_rescan(
        clock: list[float]) -> None:
    policy = FullCollections(rescan_seconds=10.0, clock=lambda: clock[0])
    policy.install()
    try:
        node = Node()
        node.other = node
        alive = weakref.ref(node)
        gc.collect()  # a full pass: the node survives it and is frozen
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None, "a frozen cycle is out of the full passes until the rescan"
        clock[0] = 10.0
        gc.collect()  # ends the period: everything frozen is back in generation 2
        assert gc.get_freeze_count() == 0
        gc.collect()  # walks it all: the cycle is freed
        assert alive() is None
        assert gc.get_freeze_count() > 0, "and what this pass kept is frozen again"
    finally:
        policy.uninstall()


def test_objects_without_cycles_are_freed_when_frozen_as_ever(clock: list[float]) -> None:
    policy = FullCollections(rescan_seconds=10.0, clock=lambda: clock[0])
    policy.install()
    try:
        node = Node()
        alive = weakref.ref(node)
        gc.collect()
        del node  # its reference count drops to zero: freed at once, frozen or not
        assert alive() is None
    finally:
        policy.uninstall()


def test_uninstalled_it_freezes_nothing(clock: list[float]) -> None:
    policy = FullCollections(rescan_seconds=10.0, clock=lambda: clock[0])
    policy.install()
    policy.install()  # once only
    policy.uninstall()
    assert policy._after_collection not in gc.callbacks
    gc.unfreeze()
    gc.collect()
    assert gc.get_freeze_count() == 0


def test_the_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rescan_seconds"):
        FullCollections(rescan_seconds=0)

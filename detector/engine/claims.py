"""Run claims as the engine hands them out: none without a store, else the store's,
forgetting the run when a shared store's last claim goes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from detector.ports import RunClaim

if TYPE_CHECKING:
    from detector.engine import Engine


class _NoClaim:
    """The claim of an engine without a store: nothing to hold."""

    def release(self) -> bool:
        return True


class _EngineClaim:
    """A store claim that also forgets the run when a shared store's last claim goes."""

    def __init__(self, engine: Engine, run_id: str, claim: RunClaim) -> None:
        self._engine = engine
        self._run_id = run_id
        self._claim: RunClaim | None = claim

    def release(self) -> bool:
        claim, self._claim = self._claim, None
        if claim is None:  # idempotent
            return True
        last = claim.release()
        store = self._engine.store
        if last and store is not None and store.shared:
            self._engine.forget(self._run_id)
        return last

"""One LLM ledger for a whole Ray cluster: a named actor behind the ``fusion.llm`` Ledger interface.

Every scorer actor of a job (and every Serve replica) gets a :class:`RayLedger` pointing at
the same named :class:`LedgerActor`, so the dollar budget, the global concurrency cap and
the request/token rates hold for all of them together. The actor wraps
:class:`fusion.llm.LocalLedger`; its methods run one at a time (a plain Ray actor), so the
check-and-reserve stays atomic across processes and nodes.

The ledger survives its own death. It journals every reservation and settlement to SQLite
(:mod:`fusion.llm.journal`) before it answers; Ray restarts it (``max_restarts=-1``) on the
head node, where its journal lives, and re-sends the calls that were in flight
(``max_task_retries=-1``). The restarted actor resumes from the journal, and each request
carries a key, so a re-sent reservation returns the grant it already got and a re-sent
settlement counts once: no reset to $0, no double count.

```python
ledger = shared_ledger("labelfuse-ledger", config.llm_limits)   # create or attach
clf = AutoFusionClassifier.load(path, ledger=ledger)             # in any worker
```
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import ray

from fusion.config import LLMLimitsConfig, cache_home
from fusion.llm.ledger import Denial, Grant, LocalLedger

HEAD_NODE = "node:__internal_head__"  # the resource only the head node has (Ray Train pins its state actor so)


def default_journal(name: str, namespace: str) -> Path:
    return cache_home() / "ledgers" / f"{namespace}.{name}.sqlite"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LedgerActor:
    """Holds the shared :class:`LocalLedger`. ``num_cpus=0``: it must never wait for a CPU slot."""

    def __init__(self, limits: dict[str, Any], name: str, namespace: str):
        # the default journal is resolved here, on the head node where the actor always runs
        self._ledger = LocalLedger.from_limits(LLMLimitsConfig(**limits), journal=default_journal(name, namespace))

    def try_reserve(self, tokens: int, max_cost_usd: float, key: str | None = None) -> Grant | Denial:
        return self._ledger.try_reserve(tokens, max_cost_usd, key)

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> None:
        self._ledger.settle(grant_id, tokens, cost_usd)

    def snapshot(self) -> dict[str, float]:
        return self._ledger.snapshot()

    def set_limits(self, limits: dict[str, Any]) -> None:
        self._ledger.set_limits(*LocalLedger.limit_args(LLMLimitsConfig(**limits)))

    def journal(self) -> str | None:
        return None if self._ledger.journal is None else str(self._ledger.journal.path)

    def discard(self) -> None:
        """Delete the journal (a run's own ledger, when the run is over); the actor is killed next."""
        j = self._ledger.journal
        if j is not None:
            j.close()
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(f"{j.path}{suffix}").unlink(missing_ok=True)


class RayLedger:
    """The Ledger interface over a :class:`LedgerActor` handle; picklable, so it travels to workers.

    ``try_reserve`` and ``settle`` return ObjectRefs, which :func:`fusion.llm.ledger.acquire`
    awaits; ``snapshot`` blocks and returns the numbers.
    """

    def __init__(self, actor: Any):
        self.actor = actor

    def try_reserve(self, tokens: int, max_cost_usd: float, key: str | None = None) -> Any:
        # the key makes Ray's re-send after a ledger restart return the same grant, not a second one
        return self.actor.try_reserve.remote(tokens, max_cost_usd, key or uuid.uuid4().hex)

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> Any:
        return self.actor.settle.remote(grant_id, tokens, cost_usd)

    def snapshot(self) -> dict[str, float]:
        return ray.get(self.actor.snapshot.remote())

    def discard(self) -> None:
        """End a ledger that only this run used: its journal deleted, its actor gone."""
        ray.get(self.actor.discard.remote())
        ray.kill(self.actor, no_restart=True)


def shared_ledger(
    name: str, limits: LLMLimitsConfig, namespace: str | None = None, detached: bool = False
) -> RayLedger:
    """Create the named ledger actor, or attach to it if this cluster already has one.

    A job's limits are the first creator's; later callers attach to the running ledger. A
    ``detached`` ledger (Serve's) outlives its creator, since the replica that created it may
    be replaced, and takes the limits of each caller that attaches: the bundle loaded last
    sets them, and what was spent stays. The actor runs on the head node; its journal is
    ``limits.ledger_journal`` or :func:`default_journal` there.
    """
    namespace = namespace or ray.get_runtime_context().namespace  # the journal's name says whose ledger it is
    actor = LedgerActor.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        resources={HEAD_NODE: 0.001},
        scheduling_strategy="DEFAULT",  # never inside the caller's placement group
    ).remote(limits.model_dump(), name, namespace)
    if detached:
        ray.get(actor.set_limits.remote(limits.model_dump()))
    return RayLedger(actor)

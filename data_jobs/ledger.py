"""One LLM ledger for a whole Ray cluster: a named actor behind the ``fusion.llm`` Ledger interface.

Every scorer actor of a job (and every Serve replica) gets a :class:`RayLedger` pointing at
the same named :class:`LedgerActor`, so the dollar budget, the global concurrency cap and
the request/token rates hold for all of them together. The actor wraps
:class:`fusion.llm.LocalLedger`; its methods run one at a time (a plain Ray actor), so the
check-and-reserve stays atomic across processes and nodes.

```python
ledger = shared_ledger("labelfuse-ledger", config.llm_limits)   # create or attach
clf = AutoFusionClassifier.load(path, ledger=ledger)             # in any worker
```
"""

from __future__ import annotations

from typing import Any

import ray

from fusion.config import LLMLimitsConfig
from fusion.llm.ledger import Denial, Grant, LocalLedger


@ray.remote(num_cpus=0, max_restarts=0)
class LedgerActor:
    """Holds the shared :class:`LocalLedger`. ``num_cpus=0``: it must never wait for a CPU slot."""

    def __init__(self, limits: dict[str, Any]):
        self._ledger = LocalLedger.from_limits(LLMLimitsConfig(**limits))

    def try_reserve(self, tokens: int, max_cost_usd: float) -> Grant | Denial:
        return self._ledger.try_reserve(tokens, max_cost_usd)

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> None:
        self._ledger.settle(grant_id, tokens, cost_usd)

    def snapshot(self) -> dict[str, float]:
        return self._ledger.snapshot()


class RayLedger:
    """The Ledger interface over a :class:`LedgerActor` handle; picklable, so it travels to workers.

    ``try_reserve`` and ``settle`` return ObjectRefs, which :func:`fusion.llm.ledger.acquire`
    awaits; ``snapshot`` blocks and returns the numbers.
    """

    def __init__(self, actor: Any):
        self.actor = actor

    def try_reserve(self, tokens: int, max_cost_usd: float) -> Any:
        return self.actor.try_reserve.remote(tokens, max_cost_usd)

    def settle(self, grant_id: int, tokens: int, cost_usd: float) -> Any:
        return self.actor.settle.remote(grant_id, tokens, cost_usd)

    def snapshot(self) -> dict[str, float]:
        return ray.get(self.actor.snapshot.remote())


def shared_ledger(name: str, limits: LLMLimitsConfig, namespace: str | None = None) -> RayLedger:
    """Create the named ledger actor, or attach to it if this cluster already has one.

    The limits of the first creator win; later callers attach to the running ledger.
    """
    actor = LedgerActor.options(name=name, namespace=namespace, get_if_exists=True).remote(limits.model_dump())
    return RayLedger(actor)

"""Golden replay of every round and async policy: the same seed gives the same event trace
(who was folded at which step, with which weight and staleness) and the same model bits.

Clients are the stand-ins of ``tests.sim.fakes`` (no BLAS) and the accumulator is float64,
so the digests do not depend on the machine. A change to a policy's semantics must update
``expected_policies.json`` deliberately: ``FEDAGG_UPDATE_GOLDEN=1 pytest tests/golden``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fedagg
from fedagg import sim, staleness, weighting
from tests.sim.fakes import FakeAlgorithm, FakeData, FakeModel

GOLDEN = Path(__file__).with_name("expected_policies.json")
SIZES = [12, 7, 30, 22, 5, 18, 9, 40, 16, 25]

POLICIES: dict[str, Callable[[fedagg.Strategy], Any]] = {
    "sync": lambda s: sim.SyncPolicy(s, 8, 4),
    "fedau": lambda s: sim.SyncPolicy(s, 8, 10, weighting=weighting.fedau(6)),
    "fedbuff": lambda s: sim.fedbuff(s, 10, 3, 6),
    # the sample-count weighting, FedBuff's default until issue 13: the old "fedbuff" digests
    "fedbuff-examples": lambda s: sim.fedbuff(s, 10, 3, 6, weights="examples"),
    "fedbuff-unbiased": lambda s: sim.fedbuff(s, 10, 3, 6, weights="unbiased"),
    "fedasync": lambda s: sim.fedasync(s, 12, 0.6, staleness=staleness.hinge(10, 2)),
    "fedfix": lambda s: sim.fedfix(s, 10, 0.08),
    "async-unbiased": lambda s: sim.async_fedavg(s, 12, weights="unbiased"),
}


def trace(name: str) -> dict[str, str]:
    strategy = fedagg.strategies.fedavg(aggregator=fedagg.aggregators.mean("float64"))
    system = sim.SystemModel(
        len(SIZES),
        seed=5,
        compute=sim.Distribution("lognormal", 1000.0, 0.8),
        dropout=0.1,
        jitter=0.3,
        availability=sim.Availability("bernoulli", p=0.7),
    )
    policy = POLICIES[name](strategy)
    res = sim.Simulation(
        FakeData(SIZES), FakeModel(), FakeAlgorithm(), strategy, policy, system, seed=3
    ).run()
    events = [
        (r.stats.participants, [float(w).hex() for w in r.stats.omega], r.stats.staleness_max)
        for r in res.records
    ]
    return {
        "model": hashlib.sha256(res.server.params.tobytes()).hexdigest(),
        "trace": hashlib.sha256(json.dumps(events).encode()).hexdigest(),
    }


def test_policies_replay_bit_identically_to_the_recording() -> None:
    got = {name: trace(name) for name in POLICIES}
    if os.environ.get("FEDAGG_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert got == expected


def test_traces_differ_between_policies() -> None:
    """The digests are not all of the same (trivial) run."""
    got = {name: trace(name)["trace"] for name in ("fedbuff", "fedasync", "fedfix")}
    assert len(set(got.values())) == 3

"""Every refused update has a short, stable reason, in each policy's round stats."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import policy as P
from fedagg import sim, strategies
from fedagg.core.update import Update
from fedagg.policy import format_refusals, refusal_reason
from fedagg.policy._events import MAX_REASONS, note_refusal

W = np.zeros(4, np.float32)


def good() -> dict[str, np.ndarray]:
    return {"w": np.full(4, 0.5, np.float32)}


BAD: dict[str, Any] = {
    "float64": {"w": np.full(4, 0.5, np.float64)},
    "nan": {"w": np.array([0.0, np.nan, 0.0, 0.0], np.float32)},
    "shape": {"w": np.zeros(5, np.float32)},
}
EXPECTED = {
    "dtype float64, expected float32": 1,
    "non-finite values": 1,
    "shape": 1,
}


def update(delta: Any, client: int, version: int | None = 0) -> Update:
    return Update(delta=delta, weight=10.0, client_id=str(client), base_version=version)


def drive(pol: Any, deltas: list[Any], n: int = 4, extras: list[dict[str, Any]] | None = None):
    """Start the policy, deliver one arrival per delta to the dispatched jobs in order, and
    return every RoundStats it emitted."""
    ctx = P.AllAvailable(n, 0)
    state = pol.init(pol.strategy.init({"w": W.copy()}), ctx)
    actions = pol.step(state, P.Start(0.0), ctx)
    jobs: list[tuple[int, int]] = []
    job = 0
    stats = []
    for a in actions:
        if isinstance(a, P.Dispatch):
            for c in a.clients:
                jobs.append((c, job))
                job += 1
    for i, delta in enumerate(deltas):
        c, j = jobs[i]
        extra = extras[i] if extras else {}
        acts = pol.step(state, P.Arrival(1.0 + i, c, j, update(delta, c), extra), ctx)
        for a in acts:
            if isinstance(a, P.Applied):
                stats.append(a.stats)
            if isinstance(a, P.Dispatch):
                for c2 in a.clients:
                    jobs.append((c2, job))
                    job += 1
    return stats


def test_sync_policy_records_why_each_update_was_refused() -> None:
    st = strategies.fedavg()
    pol = P.SyncPolicy(st, rounds=1, clients_per_round=4)
    (stats,) = drive(pol, [BAD["float64"], BAD["nan"], BAD["shape"], good()])
    assert (stats.folded, stats.refused) == (1, 3)
    assert dict(stats.refusals) == EXPECTED
    assert list(stats.refusals) == sorted(stats.refusals)  # sorted by reason
    assert sum(n for _, n in stats.refusals) == stats.refused


def test_sync_policy_with_a_robust_rule_records_reasons_too() -> None:
    st = strategies.fedavg(aggregator=fedagg.aggregators.median())
    pol = P.SyncPolicy(st, rounds=1, clients_per_round=4)
    (stats,) = drive(pol, [BAD["float64"], BAD["nan"], BAD["shape"], good()])
    assert dict(stats.refusals) == EXPECTED


def test_a_malformed_scaffold_control_variate_is_named() -> None:
    st = strategies.fedavg()
    pol = P.SyncPolicy(st, rounds=1, clients_per_round=2, scaffold=True)
    extras = [{"delta_c": {"w": np.zeros(3, np.float32)}}, {"delta_c": {"w": W.copy()}}]
    (stats,) = drive(pol, [good(), good()], n=2, extras=extras)
    assert stats.refusals == (("malformed control variate", 1),)


def test_a_clean_round_has_no_refusals() -> None:
    st = strategies.fedavg()
    (stats,) = drive(P.SyncPolicy(st, rounds=1, clients_per_round=2), [good(), good()], n=2)
    assert stats.refusals == () and stats.refused == 0


def test_async_buffer_policy_records_reasons() -> None:
    st = strategies.fedavg()
    pol = P.AsyncPolicy(st, rounds=1, trigger="buffer", buffer=1, concurrency=4)
    (stats,) = drive(pol, [BAD["float64"], BAD["nan"], BAD["shape"], good()])
    assert (stats.folded, stats.refused) == (1, 3)
    assert dict(stats.refusals) == EXPECTED


def test_fedasync_mixing_records_reasons() -> None:
    st = strategies.fedavg()
    pol = sim.fedasync(st, 1, 0.5, concurrency=4)
    (stats,) = drive(pol, [BAD["float64"], BAD["nan"], BAD["shape"], good()])
    assert dict(stats.refusals) == EXPECTED


def test_fedamd_anchors_and_miners_record_reasons() -> None:
    st = strategies.fedavg()
    # anchor_prob = 2: round 0 (t mod 2 == 0) is all anchors, round 1 all miners
    pol = P.FedAMDPolicy(st, rounds=2, clients_per_round=4, anchor_prob=2)
    ctx = P.AllAvailable(4, 0)
    state = pol.init(st.init({"w": W.copy()}), ctx)
    pending = []
    out: list[Any] = []

    def take(acts: list[Any]) -> None:
        for a in acts:
            if isinstance(a, P.Dispatch):
                pending.extend((c, a.server_extra["role"]) for c in a.clients)
            if isinstance(a, P.Applied):
                out.append(a.stats)

    take(pol.step(state, P.Start(0.0), ctx))
    job = 0
    for deltas in ([good()] * 4, [BAD["float64"], BAD["nan"], BAD["shape"], good()],
                   [BAD["float64"], BAD["nan"], BAD["shape"], good()]):  # fmt: skip
        batch, pending[:] = list(pending), []
        for (c, role), d in zip(batch, deltas, strict=True):
            take(pol.step(state, P.Arrival(1.0, c, job, update(d, c), {"role": role}), ctx))
            job += 1
    anchors, miners = out
    assert dict(anchors.refusals) == EXPECTED and anchors.refused == 3
    assert dict(miners.refusals) == EXPECTED and miners.refused == 3


def test_reasons_are_short_bounded_and_hold_no_client_id() -> None:
    e = fedagg.UpdateError("client-7431", "custom rule says no to client-7431, " * 20)
    r = refusal_reason(e)
    assert "7431" not in r and "client-" not in r and len(r) <= 48
    assert refusal_reason(fedagg.StaleUpdate("c", "trained from model version 3")) == "stale"
    assert refusal_reason(fedagg.InvalidWeight("c", "weight must be > 0")) == "invalid weight"
    huge = np.dtype([("x" * 200, np.float32)])
    r = refusal_reason(fedagg.SpecMismatch("c", f"array 'w' has dtype {huge}, expected float32"))
    assert r.startswith("dtype ") and len(r) <= 48
    counts: dict[str, int] = {}
    for i in range(20):  # distinct reasons per round are capped: the rest are "other"
        note_refusal(counts, f"reason {chr(97 + i)}")
    assert len(counts) == MAX_REASONS + 1 and counts["other"] == 20 - MAX_REASONS
    assert format_refusals({"b": 1, "a": 2}) == "a: 2; b: 1"
    assert format_refusals(()) == ""


# -- through the simulator: the record, the run database, the progress line ---------------------
class Float64Algorithm:
    """Odd clients send float64 deltas (a custom client that forgot to cast)."""

    epochs = 1
    batch_size = 1

    def train_many(self, model, params, datas, rngs, *, epochs, states, server_state):  # type: ignore[no-untyped-def]
        from tests.sim.fakes import Result

        out = []
        for d in datas:
            dt = np.float64 if len(d) % 2 else np.float32
            delta = np.full(4, 0.1, dt)
            out.append((Result({"w": delta}, len(d), len(d), {"train_loss": 1.0}, {}), None))
        return out


def test_a_float64_client_is_explained_in_records_db_and_progress(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedagg.cli._simulate import _progress
    from tests.sim.fakes import FakeData, FakeModel

    st = strategies.fedavg()
    pol = P.SyncPolicy(st, rounds=3, clients_per_round=4)
    data = FakeData([10, 11, 12, 13])  # clients 1 and 3 have odd sizes: float64
    show = _progress(3, True)
    with sim.RunDB(tmp_path / "runs.db") as db:
        rid = db.start_run("f64", 0, {})

        def each(rec: Any) -> None:
            db.add_round(rid, rec.row())
            show(rec)

        res = sim.Simulation(
            data, FakeModel(), Float64Algorithm(), st, pol, sim.SystemModel(4), on_round=each
        ).run()
        rows = db.rounds(rid)
    for rec in res.records:
        assert rec.stats.refusals == (("dtype float64, expected float32", 2),)
        assert rec.row()["refusals"] == "dtype float64, expected float32: 2"
    assert [r["refusals"] for r in rows] == ["dtype float64, expected float32: 2"] * 3
    assert [r["refused"] for r in rows] == [2, 2, 2]
    err = capsys.readouterr().err
    assert "refused (6): dtype float64, expected float32: 6" in err

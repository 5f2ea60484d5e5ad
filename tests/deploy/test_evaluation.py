"""Evaluation in deployment over the in-memory transport (the real client and service, no
network): the per-task client config reaches the train function per model version through
a schedule; federated evaluation tasks go to the clients, which pull that version, evaluate
and report; reports are aggregated by a weighted mean or a ``"module:function"``; bad
reports are refused and change nothing; evaluation does not disturb training; a deployment's
run continues in the run database after a restart."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg.config import metrics_aggregator, resolve_config
from fedagg.deploy import Client, ClientKey, Federation, Keyring, Result, ServerOptions
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._evaluate import task_configs
from fedagg.deploy._evaluation import Evaluation
from fedagg.deploy._evalwire import EVAL_BASE, eval_task_id, parse_task_config, report_body
from fedagg.deploy._memory import MemoryChannel
from fedagg.deploy._record import RunRecorder
from fedagg.deploy._service import FederationService
from fedagg.errors import ConfigError
from fedagg.policy import RoundStats
from fedagg.runs import RunDB
from fedagg.sim import SyncPolicy

N = 4
D = 500
NAMES = [f"c{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})
ROUNDS = 3


def _fed(d: Path) -> Federation:
    from fedagg.deploy import canonical_strategy

    strategy = canonical_strategy(strategies.fedavg())
    policy = SyncPolicy(strategy=strategy, rounds=ROUNDS, clients_per_round=3)
    server = strategy.init({"w": np.zeros(D, np.float32)})
    return Federation(policy, server, num_clients=N, seed=3, directory=d,
                      identity={"test": "evaluation"})  # fmt: skip


def _opts() -> ServerOptions:
    return ServerOptions(listen="127.0.0.1:0", insecure=True, fsync=False, chunk_bytes=4096)


def _train(model: Any, task: Any) -> Result:
    delta = (task.rng().standard_normal(D) * 0.01).astype(np.float32)
    return Result({"w": delta}, 10 + task.job % 3, {"train_loss": 1.0})


def _client(service: FederationService, name: str, train: Any = _train,
            evaluate: Any = None) -> Client:  # fmt: skip
    channel = MemoryChannel(service, max_message=service.opt.chunk_bytes + 64 * 1024)
    return Client("memory", KEYS[name], train, evaluate=evaluate, insecure=True,
                  retry_for=5.0, heartbeat=1.0, channel=channel)  # fmt: skip


def _evaluate(model: Any, task: Any) -> dict[str, float]:
    i = task.client_index
    return {"loss": 1.0 + i, "accuracy": 0.1 * (i + 1), "num_examples": 10.0 * (i + 1),
            "w_sum": float(np.sum(model["w"], dtype=np.float64))}  # fmt: skip


async def _run(
    d: Path, *, evaluation: Evaluation | None = None, task_config: Any = None,
    train: Any = _train, evaluate: Any = _evaluate, clients: Callable[..., Client] = _client,
) -> tuple[Federation, FederationService]:  # fmt: skip
    fed = _fed(d)
    service = FederationService(fed, RING, _opts())
    if evaluation is not None:
        evaluation.attach(service)
    if task_config is not None:
        service.task_config = task_config
    await service.start()
    tasks = [asyncio.create_task(clients(service, n, train, evaluate).run_async())
             for n in NAMES]  # fmt: skip
    try:
        await asyncio.wait_for(service.wait(), 30)
        if evaluation is not None:
            await asyncio.wait_for(evaluation.drain(), 30)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.stop()
        if evaluation is not None:
            evaluation.close()
    return fed, service


def _module(tmp_path: Path, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(source)
    sys.modules.pop(name, None)
    return str(tmp_path)


# -- per-task client config ----------------------------------------------------------------------
def test_the_client_config_reaches_train_per_version_through_the_schedule(tmp_path: Path) -> None:
    source = (
        "def schedule(version, config):\n"
        "    return {'lr': config['lr'] / (1 + version), 'round': version}\n"
    )
    code = _module(tmp_path, "h5_sched", source)
    cfg = resolve_config({"code_path": code, "client": {
        "config": {"lr": 0.5, "optimizer": "sgd", "nesterov": True},
        "schedule": "h5_sched:schedule"}})  # fmt: skip
    seen: list[tuple[int, str, dict[str, Any]]] = []

    def train(model: Any, task: Any) -> Result:
        seen.append((task.version, task.kind, dict(task.config)))
        return _train(model, task)

    asyncio.run(_run(tmp_path / "s", task_config=task_configs(cfg), train=train))
    assert len(seen) == 3 * ROUNDS
    for version, kind, config in seen:
        assert kind == "train"
        assert config == {"lr": 0.5 / (1 + version), "round": version, "optimizer": "sgd",
                          "nesterov": True}  # fmt: skip
    assert {v for v, _, _ in seen} == {0, 1, 2}


def test_a_bad_client_config_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    code = _module(tmp_path, "h5_badsched", "def schedule(version, config):\n"
                   "    return {'lr': [1, 2]}\n")  # fmt: skip
    cfg = resolve_config({"code_path": code, "client": {"schedule": "h5_badsched:schedule"}})
    with pytest.raises(ConfigError, match=r"'lr'.*bool, int, float or str"):
        task_configs(cfg)
    for bad, why in (
        ("[1, 2]", "not a JSON object"), ('{"a": {"b": 1}}', "booleans, numbers or strings"),
        ('{"a": NaN}', "not valid JSON"), ("{" * 10, "not valid JSON"),
        ('{"a": "' + "x" * 70_000 + '"}', "over 65536 bytes"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            parse_task_config(bad)
    assert parse_task_config('{"lr": 0.1, "on": true, "s": "x"}') == {"lr": 0.1, "on": True,
                                                                      "s": "x"}  # fmt: skip


def test_a_client_given_a_malformed_task_stops_with_a_clear_error(tmp_path: Path) -> None:
    async def go() -> None:
        service = FederationService(_fed(tmp_path / "m"), RING, _opts())
        service.task_config = lambda version: '{"lr": [0.1]}'  # not what a server sends
        await service.start()
        tasks = [asyncio.create_task(_client(service, n).run_async()) for n in NAMES]
        try:
            done, _ = await asyncio.wait(tasks, timeout=20, return_when=asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in done if t.exception() is not None]
            assert errors, "no client stopped"
            assert all(isinstance(e, ConfigError) for e in errors), errors
            assert "from the server: the task's config 'lr'" in str(errors[0])
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await service.stop()

    asyncio.run(go())


# -- federated evaluation -------------------------------------------------------------------------
def _weighted(reports: list[tuple[float, dict[str, float]]], key: str) -> float:
    return sum(n * m[key] for n, m in reports) / sum(n for n, _ in reports)


def test_federated_evaluation_aggregates_the_clients_reports(tmp_path: Path) -> None:
    server_seen: dict[int, float] = {}

    def server_eval(params: dict[str, Any]) -> dict[str, float]:
        assert not params["w"].flags.writeable
        return {
            "loss": 0.5,
            "accuracy": 0.75,
            "w_sum": float(np.sum(params["w"], dtype=np.float64)),
        }

    ev = Evaluation(server_eval=server_eval, eval_every=2, fed_every=1, timeout=20.0)
    fed, service = asyncio.run(_run(tmp_path / "e", evaluation=ev))
    by = {(v, src): m for _, v, src, m in ev.results}
    # every model version, asked of all four clients (all connected), weighted by examples
    reports = [(10.0 * (i + 1), {"loss": 1.0 + i, "accuracy": 0.1 * (i + 1)}) for i in range(N)]
    for v in range(1, ROUNDS + 1):
        m = by[(v, "clients")]
        assert m["loss"] == pytest.approx(_weighted(reports, "loss"))
        assert m["accuracy"] == pytest.approx(_weighted(reports, "accuracy"))
        server_seen[v] = by[(v, "server")]["w_sum"] if (v, "server") in by else math.nan
    # the server evaluates every eval_every = 2 rounds and the last: versions 2 and 3
    assert sorted(v for _, v, src, _ in ev.results if src == "server") == [2, 3]
    # the clients evaluated the very model the server did
    for v in (2, 3):
        assert by[(v, "clients")]["w_sum"] == pytest.approx(server_seen[v], abs=1e-9)
    assert not ev.open
    # evaluation did not disturb training: the same model as without it
    plain, _ = asyncio.run(_run(tmp_path / "plain"))
    assert fed.server.version == plain.server.version == ROUNDS
    assert fed.server.params.tobytes() == plain.server.params.tobytes()
    assert service.stats.uploads == 3 * ROUNDS


def test_client_metrics_aggregated_by_a_named_function(tmp_path: Path) -> None:
    code = _module(tmp_path, "h5_metrics", "def agg(reports):\n"
                   "    return {'clients': len(reports),\n"
                   "            'accuracy': max(m['accuracy'] for _, m in reports)}\n")  # fmt: skip
    cfg = resolve_config({"code_path": code, "eval_metrics": "h5_metrics:agg"})
    ev = Evaluation(fed_every=2, fed_clients=2, timeout=20.0, aggregate=metrics_aggregator(cfg))
    asyncio.run(_run(tmp_path / "f", evaluation=ev))
    results = [(v, m) for _, v, src, m in ev.results if src == "clients"]
    # every fed_every = 2 versions and the last; two clients asked each time
    assert [v for v, _ in results] == [2, 3]
    for _, m in results:
        assert m["clients"] == 2
        assert m["accuracy"] in {0.1 * (i + 1) for i in range(N)}


def _failing(model: Any, task: Any) -> dict[str, float]:
    raise RuntimeError("no data here")


@pytest.mark.parametrize("evaluate", [None, _failing, lambda model, task: [1.0]])
def test_a_client_that_cannot_evaluate_reports_nothing_and_training_goes_on(
    tmp_path: Path, evaluate: Any
) -> None:
    ev = Evaluation(fed_every=1, timeout=20.0)
    fed, service = asyncio.run(_run(tmp_path / "n", evaluation=ev, evaluate=evaluate))
    assert ev.results == []  # weight 0 everywhere: no metrics
    assert not ev.open and sorted(ev.reported) == [1, 2, 3]  # every client answered
    assert all(len(who) == N for who in ev.reported.values())
    assert fed.server.version == ROUNDS and service.stats.uploads == 3 * ROUNDS


# -- bad reports ----------------------------------------------------------------------------------
async def _call(c: Client, req: pb.ReportRequest) -> tuple[str, str]:
    try:
        raw = await c._method("Report", "unary_unary")(req.SerializeToString(), timeout=5)
        return "OK", "duplicate" if pb.ReportReply.FromString(raw).duplicate else "accepted"
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or ""


def _signed(c: Client, task: int, version: int, n: float, metrics: dict[str, float],
            sign_as: dict[str, float] | None = None) -> pb.ReportRequest:  # fmt: skip
    content = report_body(task, version, n, metrics if sign_as is None else sign_as)
    return pb.ReportRequest(auth=c._auth("Report", content), task=task, version=version,
                            num_examples=n, metrics=metrics)  # fmt: skip


def test_bad_reports_are_refused_and_change_nothing(tmp_path: Path) -> None:
    outcomes: list[tuple[str, str, str]] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    made: dict[str, Client] = {}

    def clients(service: FederationService, name: str, train: Any, evaluate: Any) -> Client:
        made[name] = _client(service, name, train, evaluate)
        return made[name]

    def evaluate(model: Any, task: Any) -> dict[str, float]:
        if task.client_index == 0 and task.version == 1:
            fut = asyncio.run_coroutine_threadsafe(_bad(made["c0"], task), loop_box[0])
            outcomes.extend(fut.result(20))
        return _evaluate(model, task)

    async def _bad(c: Client, task: Any) -> list[tuple[str, str, str]]:
        t, v = task.job, task.version
        out = []
        cases = {
            "nan": _signed(c, t, v, 5.0, {"accuracy": math.nan}),
            "inf weight": _signed(c, t, v, math.inf, {"accuracy": 0.5}),
            "negative weight": _signed(c, t, v, -1.0, {"accuracy": 0.5}),
            "too many": _signed(c, t, v, 5.0, {f"m{i}": 1.0 for i in range(65)}),
            "bad name": _signed(c, t, v, 5.0, {"a b": 1.0}),
            "unknown task": _signed(c, EVAL_BASE + 999, 999, 5.0, {"accuracy": 0.5}),
            "wrong kind": _signed(c, 0, 0, 5.0, {"accuracy": 0.5}),
            "wrong version": _signed(c, t, v + 1, 5.0, {"accuracy": 0.5}),
            "forged": _signed(c, t, v, 5.0, {"accuracy": 0.9}, sign_as={"accuracy": 0.5}),
        }
        for what, req in cases.items():
            out.append((what, *await _call(c, req)))
        good = _signed(c, t, v, 5.0, {"accuracy": 0.5, "loss": 2.0})
        out.append(("good", *await _call(c, good)))
        out.append(("replayed", *await _call(c, good)))  # the same signed bytes again
        again = _signed(c, t, v, 500.0, {"accuracy": 0.0, "loss": 9.0})
        out.append(("again", *await _call(c, again)))
        return out

    async def go() -> Evaluation:
        loop_box.append(asyncio.get_running_loop())
        ev = Evaluation(fed_every=1, timeout=20.0)
        await _run(tmp_path / "b", evaluation=ev, evaluate=evaluate, clients=clients)
        return ev

    ev = asyncio.run(go())
    got = {what: (code, msg) for what, code, msg in outcomes}
    assert got["nan"][0] == "INVALID_ARGUMENT" and "finite" in got["nan"][1]
    assert got["inf weight"][0] == "INVALID_ARGUMENT" and "num_examples" in got["inf weight"][1]
    assert got["negative weight"][0] == "INVALID_ARGUMENT"
    assert got["too many"] == ("INVALID_ARGUMENT", "too many metrics: 65 (at most 64)")
    assert got["bad name"][0] == "INVALID_ARGUMENT" and "metric name" in got["bad name"][1]
    assert got["unknown task"] == ("FAILED_PRECONDITION",
                                   f"evaluation task {EVAL_BASE + 999} is not open")  # fmt: skip
    assert got["wrong kind"][0] == "FAILED_PRECONDITION" and "training task" in got["wrong kind"][1]
    assert got["wrong version"][0] == "INVALID_ARGUMENT"
    assert got["forged"][0] == "UNAUTHENTICATED"
    assert got["good"] == ("OK", "accepted")
    assert got["replayed"][0] == "UNAUTHENTICATED"  # a replayed request: its nonce is spent
    assert got["again"] == ("OK", "duplicate")  # counted once: the first report stands
    assert eval_task_id(1) == EVAL_BASE + 1
    # version 1's metrics: c0's first valid report (weight 5, accuracy 0.5), the others' own
    m = next(m for _, v, src, m in ev.results if v == 1 and src == "clients")
    reports = [(5.0, {"accuracy": 0.5, "loss": 2.0})] + [
        (10.0 * (i + 1), {"accuracy": 0.1 * (i + 1), "loss": 1.0 + i}) for i in range(1, N)
    ]
    assert m["accuracy"] == pytest.approx(_weighted(reports, "accuracy"))
    assert m["loss"] == pytest.approx(_weighted(reports, "loss"))


# -- the run database -----------------------------------------------------------------------------
def _stats(r: int) -> RoundStats:
    return RoundStats(round=r, version=r + 1, started=float(r), ended=r + 1.0, selected=3,
                      dispatched=3, folded=3, dropped=0, refused=0, late=0, weight=30.0,
                      client_loss=0.5, staleness_mean=0.0, participants=(0, 1, 2),
                      applied=True)  # fmt: skip


def test_a_restarted_deployment_continues_its_run_without_duplicate_rows(tmp_path: Path) -> None:
    db = tmp_path / "runs" / "fedagg.db"
    cfg = {"name": "deployed", "seed": 1, "max_time": math.inf}
    rec = RunRecorder(db, "deployed", 1, cfg, model_bytes=4 * D)
    rec.round(_stats(0))  # before bind: kept, written at bind
    meta = rec.bind({"run_id": None, "run_db": None})
    rec.metrics(0, 1, "server", {"loss": 0.3, "accuracy": 0.9})
    rec.round(_stats(1))
    rec.metrics(1, 2, "clients", {"loss": 0.4, "accuracy": 0.8, "other": 1.0})
    rec.finish("interrupted")
    # the restarted server: rounds 1 and 2 replayed (already recorded), then round 3
    again = RunRecorder(db, "deployed", 1, cfg, model_bytes=4 * D)
    for r in (0, 1):
        again.round(_stats(r))
    assert again.bind(meta) == meta
    again.metrics(0, 1, "server", {"loss": 9.0, "accuracy": 0.0})  # not written again
    again.round(_stats(2))
    again.finish("finished")
    with RunDB(db) as runs:
        (info,) = runs.runs()
        assert (info.id, info.name, info.status) == (int(meta["run_id"]), "deployed", "finished")
        assert info.config["max_time"] == "inf"
        rows = runs.rounds(info.id)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (rows[0]["test_accuracy"], rows[0]["test_loss"]) == (0.9, 0.3)
    assert (rows[1]["client_accuracy"], rows[1]["client_loss"]) == (0.8, 0.4)
    assert rows[2]["test_accuracy"] is None and rows[2]["client_loss"] == 0.5
    assert rows[2]["bytes_down"] == 3 * 4 * D and rows[2]["virtual_time"] == 3.0
    assert all(r["wall_time"] >= 0 for r in rows)
    # another run database: a new run there
    other = RunRecorder(tmp_path / "other.db", "deployed", 1, cfg)
    assert other.bind(meta)["run_id"] == "1" and other.run_id == 1
    other.finish("finished")
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert {"runs", "rounds"} <= tables


# -- through an edge aggregator ----------------------------------------------------------------
EDGE = ClientKey("e0", Ed25519PrivateKey.generate())
EDGES = Keyring({"e0": EDGE.private.public_key()})


def test_an_edge_passes_the_client_config_on_and_gets_no_evaluation_task(tmp_path: Path) -> None:
    from fedagg.deploy import EdgeEngine, EdgeServer, ParentLink
    from fedagg.deploy._memory import MemoryTransport

    seen: list[tuple[int, str, dict[str, Any]]] = []
    evaluated: list[int] = []

    def train(model: Any, task: Any) -> Result:
        seen.append((task.version, task.kind, dict(task.config)))
        return _train(model, task)

    def evaluate(model: Any, task: Any) -> dict[str, float]:
        evaluated.append(task.version)
        return {"accuracy": 1.0}

    async def go() -> Evaluation:
        d = tmp_path
        fed = _fed(d / "root")
        root = FederationService(fed, RING, _opts(), edges=EDGES, edge_clients={"e0": range(N)})
        root.task_config = lambda version: f'{{"version": {version}, "via": "root"}}'
        ev = Evaluation(fed_every=1, timeout=5.0).attach(root)
        await root.start()
        engine = EdgeEngine(fed.policy.strategy.aggregator, fed.spec, num_clients=N,
                            directory=d / "edge", mode="relay")  # fmt: skip
        link = ParentLink("memory", EDGE, range(N), insecure=True, retry_for=5.0,
                          channel=MemoryChannel(root))  # fmt: skip
        edge = EdgeServer(engine, RING, _opts(), link, serves=set(range(N)),
                          transport=MemoryTransport)  # fmt: skip
        clients: list[asyncio.Task[Any]] = []
        try:
            starting = asyncio.create_task(edge.start())
            clients = [asyncio.create_task(_client(edge.service, n, train, evaluate).run_async())
                       for n in NAMES]  # fmt: skip
            await asyncio.wait_for(starting, 30)
            await asyncio.wait_for(root.wait(), 30)
            await asyncio.wait_for(ev.drain(), 30)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
        finally:
            for c in clients:
                c.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await edge.stop()
            await root.stop()
            ev.close()
        return ev

    ev = asyncio.run(go())
    assert len(seen) == 3 * ROUNDS
    assert all(c == {"version": v, "via": "root"} and k == "train" for v, k, c in seen)
    assert evaluated == [] and ev.results == []  # clients behind an edge are not asked


# -- a config's evaluation ---------------------------------------------------------------------
def test_a_configs_evaluate_and_held_out_data_are_what_server_and_clients_use(
    tmp_path: Path,
) -> None:
    from fedagg.clients import Task
    from fedagg.deploy import config_evaluator, evaluation_from_config

    code = _module(tmp_path, "h5_user", (
        "import numpy as np\n"
        "def heldout():\n"
        "    return np.ones((6, 64), np.float32), np.arange(6) % 10\n"
        "def evaluate(params, data, task):\n"
        "    logits = data.x @ params['W'] + params['b']\n"
        "    return {'accuracy': float((logits.argmax(1) == data.y).mean()),\n"
        "            'kind': 0.0 if task is None else 1.0}\n"
    ))  # fmt: skip
    base = {"code_path": code, "data": {"name": "digits", "num_clients": 3, "partition": "iid"}}
    params = {"W": np.zeros((64, 10), np.float32), "b": np.eye(10, dtype=np.float32)[3]}
    # the model's own evaluation, on the dataset's test split
    ev = evaluation_from_config(resolve_config(base))
    assert ev.server_eval is not None
    m = ev.server_eval(params)
    assert set(m) == {"loss", "accuracy"} and 0 < m["accuracy"] < 0.3  # predicts class 3
    task = Task(EVAL_BASE + 1, 1, 0, 0, client_index=2, kind="evaluate")
    mine = config_evaluator(resolve_config(base))(params, task)
    assert set(mine) == {"loss", "accuracy", "num_examples"} and mine["num_examples"] > 0
    # the user's evaluate, on the user's held-out data (task None on the server)
    user = resolve_config({**base, "eval_data": "h5_user:heldout",
                           "client": {"evaluate": "h5_user:evaluate"}})  # fmt: skip
    ev = evaluation_from_config(user)
    assert ev.server_eval is not None
    assert ev.server_eval(params) == {"accuracy": 1 / 6, "kind": 0.0}
    mine = config_evaluator(user)(params, task)
    assert mine["kind"] == 1.0 and mine["num_examples"] > 0  # the client's share, weighted
    # held-out data from a file; bad references name their key
    np.savez(tmp_path / "held.npz", x=np.ones((4, 64), np.float32), y=np.full(4, 3))
    ev = evaluation_from_config({**base, "eval_data": str(tmp_path / "held.npz")})
    assert ev.server_eval is not None and ev.server_eval(params)["accuracy"] == 1.0
    for bad, key in (
        ({"eval_data": "h5_user:nothing"}, "eval_data"),
        ({"eval_data": str(tmp_path / "missing.npz")}, "eval_data"),
        ({"client": {"evaluate": "h5_user:absent"}}, "client.evaluate"),
        ({"deploy": {"fed_eval_every": -1}}, "deploy.fed_eval_every"),
        ({"deploy": {"eval_timeout": 0}}, "deploy.eval_timeout"),
    ):
        with pytest.raises(ConfigError, match=key):
            evaluation_from_config({**base, **bad})

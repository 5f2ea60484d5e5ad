"""The end-to-end demo (fedagg.demo) and the command line (fedagg.cli)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import fedagg
from fedagg import demo
from fedagg.cli import main
from fedagg.clients import LocalSGD
from fedagg.models import LogReg

# Small settings that run fast: 10 clients, all of them in every round.
SMALL = {"rounds": 5, "clients": 10, "per_round": 10}


@pytest.fixture(scope="module")
def small_run() -> list[demo.RoundRecord]:
    return demo.run_demo(seed=0, **SMALL)


def _last(records: list[demo.RoundRecord], strategy: str) -> demo.RoundRecord:
    return [r for r in records if r.strategy == strategy][-1]


# -- data and model (the library's: fedagg.data, fedagg.models, fedagg.clients) -------------


def test_federated_digits_is_a_skewed_partition_with_a_held_out_test_set() -> None:
    fd = demo.federated_digits(seed=0, num_clients=20)
    assert len(fd.clients) == 20
    # every example once: a stratified 25% test split (each class rounds its own quarter)
    assert sum(len(c.y) for c in fd.clients) + len(fd.test.y) == 1797
    assert len(fd.test.y) == 451
    for c in fd.clients:
        assert c.x.dtype == np.float32 and c.x.shape == (len(c.y), 64)
        assert c.x.min() >= 0.0 and c.x.max() <= 1.0
    assert min(len(c.y) for c in fd.clients) >= 10
    # Non-IID: clients' label histograms are far from uniform.
    largest_share = [np.bincount(c.y, minlength=10).max() / len(c.y) for c in fd.clients]
    assert np.median(largest_share) > 0.3
    assert len(demo.federated_digits(seed=0, num_clients=demo.MAX_CLIENTS).clients) == 200


def test_initial_loss_is_log_num_classes() -> None:
    fd = demo.federated_digits(seed=0, num_clients=5)
    model = LogReg(fd.num_features, fd.num_classes)
    loss, _ = model.evaluate(model.init(0), fd.test.x, fd.test.y)
    assert loss == pytest.approx(math.log(10))


# -- the demo ------------------------------------------------------------------------------


def test_demo_learns(small_run: list[demo.RoundRecord]) -> None:
    assert [(r.strategy, r.round) for r in small_run] == [
        (s, k) for s in ("fedavg", "fedadam") for k in range(1, 6)
    ]
    for strategy in ("fedavg", "fedadam"):
        recs = [r for r in small_run if r.strategy == strategy]
        assert all(r.clients == 10 and r.refused == () for r in recs)
        assert recs[-1].test_accuracy > 0.85, recs
        assert recs[0].test_loss < math.log(10)  # the loss of the all-zero initial model
        assert recs[-1].test_loss < 0.6 * recs[0].test_loss


def test_same_seed_same_bits(small_run: list[demo.RoundRecord]) -> None:
    again = demo.run_demo(seed=0, **SMALL)
    assert again == small_run  # includes a sha256 of the global model after every round
    assert [r.params_sha256 for r in again] == [r.params_sha256 for r in small_run]


def test_same_seed_same_final_params() -> None:
    """With clients sampled (4 of 8 per round), two runs end on the same models, bit for bit."""
    runs = [demo.run_demo(seed=3, rounds=2, clients=8, per_round=4) for _ in range(2)]
    assert runs[0] == runs[1]
    finals = [[_last(run, s) for s in ("fedavg", "fedadam")] for run in runs]
    assert [r.params_sha256 for r in finals[0]] == [r.params_sha256 for r in finals[1]]
    assert all(r.round == 2 and r.clients == 4 for r in finals[0] + finals[1])


def test_different_seed_differs(small_run: list[demo.RoundRecord]) -> None:
    other = demo.run_demo(seed=1, **SMALL)
    assert all(a.params_sha256 != b.params_sha256 for a, b in zip(other, small_run, strict=True))


def test_bad_client_is_refused_and_named() -> None:
    kwargs = {"seed": 0, "rounds": 2, "clients": 10, "per_round": 5}
    bad = demo.run_demo(**kwargs, inject_bad=True)
    good = demo.run_demo(**kwargs, inject_bad=False)
    client_ids = {f"client-{i:02d}" for i in range(10)}

    refusing = [r for r in bad if r.refused]
    assert [(r.strategy, r.round) for r in refusing] == [("fedavg", 2)]
    (rec,) = refusing
    (refusal,) = rec.refused
    assert refusal.client_id in client_ids
    assert "NaN" in refusal.reason
    assert rec.clients == 4  # the round went on with the other four clients
    assert math.isfinite(rec.test_loss) and rec.test_accuracy > 0.5
    # Before the bad round, and in the other strategy, nothing changes.
    assert bad[0] == good[0]
    assert bad[2:] == good[2:]
    assert bad[1] != good[1]


def test_refused_update_leaves_the_aggregate_unchanged() -> None:
    fd = demo.federated_digits(seed=0, num_clients=5)
    model = LogReg(fd.num_features, fd.num_classes)
    algo = LocalSGD(epochs=demo.LOCAL_EPOCHS, batch_size=demo.BATCH_SIZE, lr=demo.CLIENT_LR)
    strategy = fedagg.strategies.fedavg()
    server = strategy.init(model.init(0))
    params = server.model
    assert isinstance(params, dict)
    deltas = []
    for k, client in enumerate(fd.clients[:3]):
        result, _ = algo.train(model, params, client, np.random.default_rng(k))
        deltas.append({n: np.array(v) for n, v in result.delta.items()})
    agg = strategy.begin(server)
    for k, (client, delta) in enumerate(zip(fd.clients[:2], deltas[:2], strict=True)):
        update = fedagg.Update(delta, float(len(client.y)), f"client-{k:02d}", 0)
        agg = strategy.aggregator.fold(agg, update)
    before = strategy.aggregator.finalize_flat(agg).tobytes()

    poisoned = deltas[2]
    poisoned["b"][4] = np.nan
    with pytest.raises(fedagg.NonFiniteUpdate) as info:
        strategy.aggregator.fold(agg, fedagg.Update(poisoned, 9.0, "client-02", 0))
    assert info.value.client_id == "client-02"
    assert strategy.aggregator.count(agg) == 2
    assert strategy.aggregator.finalize_flat(agg).tobytes() == before


def test_run_demo_rejects_bad_settings() -> None:
    with pytest.raises(fedagg.ConfigError):
        demo.run_demo(clients=5, per_round=6)
    with pytest.raises(fedagg.ConfigError):
        demo.run_demo(rounds=0)
    with pytest.raises(fedagg.ConfigError):
        demo.run_demo(seed=-1)


def test_importing_has_no_side_effects() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import fedagg.demo, fedagg.cli"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout == "" and out.stderr == ""


# -- the CLI -------------------------------------------------------------------------------


def test_cli_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--seed", "0", "--rounds", "2", "--clients", "10", "--per-round", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "strategy  round  test loss  test acc  clients   agg ms" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("fedavg ", "fedadam "))]
    assert [(r[0], r[1]) for r in rows] == [
        ("fedavg", "1"),
        ("fedavg", "2"),
        ("fedadam", "1"),
        ("fedadam", "2"),
    ]
    assert [r[4] for r in rows] == ["5", "4", "5", "5"]
    refused = [line for line in out.splitlines() if "refused update from client" in line]
    assert len(refused) == 1 and "client-" in refused[0] and "NaN" in refused[0]
    assert "final test accuracy: fedavg" in out


def test_cli_demo_without_bad_client(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--rounds", "1", "--clients", "6", "--per-round", "3", "--no-bad-client"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "refused" not in out.replace("0 update(s) refused", "")
    assert "0 update(s) refused" in out


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--clients", "5", "--per-round", "6"]) == 2
    assert "per_round" in capsys.readouterr().err
    assert main(["demo", "--clients", "1000"]) == 2
    captured = capsys.readouterr()
    assert "clients" in captured.err and captured.out == ""
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--rounds", "0"])
    assert exit_info.value.code == 2


def test_cli_help_lists_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "FedAdam" in out

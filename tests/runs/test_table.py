"""The results table, the stored summary of interrupted and failed runs, the run plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedagg import sim

TINY: dict[str, Any] = {
    "name": "tiny",
    "rounds": 10,
    "eval_every": 3,
    "data": {"name": "digits", "num_clients": 8, "partition": "iid"},
    "policy": {"clients_per_round": 4},
}


def shown_rounds(table: str) -> list[int]:
    return [int(line.split()[0]) for line in table.splitlines()[1:]]


def test_the_table_shows_every_evaluated_round_and_the_last() -> None:
    result, _ = sim.run_config(TINY)
    rows = [r.row() for r in result.records]
    evaluated = [r["round"] for r in rows if not math.isnan(r["test_accuracy"])]
    assert evaluated == [3, 6, 9, 10]  # eval_every = 3, and the last round
    assert shown_rounds(sim.format_table(rows)) == [3, 6, 9, 10]
    # every = k also shows every k-th round not evaluated (its metrics as "-")
    table = sim.format_table(rows, every=4)
    assert shown_rounds(table) == [1, 3, 5, 6, 9, 10]
    assert table.splitlines()[1].split()[1] == "-"


def test_rows_read_back_from_the_run_db_make_the_same_table(tmp_path: Path) -> None:
    with sim.RunDB(tmp_path / "r.db") as db:
        _, rid = sim.run_config(TINY, db=db)
        assert rid is not None
        stored = db.rounds(rid)
    assert shown_rounds(sim.format_table(stored)) == [3, 6, 9, 10]


class Stop(Exception):
    pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Stop])
def test_an_interrupted_or_failed_run_keeps_its_summary(tmp_path: Path, exc: type) -> None:
    def on_round(rec: Any) -> None:
        if rec.stats.round + 1 == 7:
            raise exc()

    with sim.RunDB(tmp_path / "r.db") as db:
        with pytest.raises(exc):
            sim.run_config(TINY, db=db, on_round=on_round)
        (run,) = db.runs()
        stored = db.rounds(run.id)
    assert run.status == ("interrupted" if exc is KeyboardInterrupt else "failed")
    assert len(stored) == run.summary["rounds"] == 7
    assert run.summary["final_accuracy"] == stored[5]["test_accuracy"]  # round 6: evaluated
    assert run.summary["num_classes"] == 10
    if exc is Stop:
        assert run.summary["error"].startswith("Stop")


def test_plot_run_uses_a_fixed_axis_and_a_chance_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    seen: list[tuple[tuple[float, float], list[Any]]] = []
    save = Figure.savefig

    def spy(self: Figure, *a: Any, **kw: Any) -> None:
        ax = self.axes[0]
        seen.append((ax.get_ylim(), [list(line.get_ydata()) for line in ax.get_lines()]))
        save(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    result, _ = sim.run_config(TINY)
    rows = [r.row() for r in result.records]
    files = sim.plot_run(rows, str(tmp_path), "tiny", num_classes=10)
    assert len(files) == 2
    for f in files:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ylim, lines in seen:
        assert ylim == (0.0, 1.0)
        assert len(lines[0]) == 4  # the evaluated rounds only
        assert lines[1] == [0.1, 0.1]  # chance: 1 / 10 classes

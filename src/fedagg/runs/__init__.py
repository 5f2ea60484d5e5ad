"""The run database: every run's config and per-round metrics, simulated or deployed.

    from fedagg.runs import RunDB
    with RunDB("runs/fedagg.db") as db:
        for run in db.runs():
            print(run.id, run.name, run.status, len(db.rounds(run.id)))

It sits below both the simulator (:mod:`fedagg.sim`) and the deployment (:mod:`fedagg.deploy`),
which record their rounds in the same schema, so ``fedagg runs`` lists and compares both.
"""

from fedagg.runs._db import (
    KINDS,
    ROUND_COLUMNS,
    STATUSES,
    TEXT_COLUMNS,
    RunDB,
    RunInfo,
    jsonable,
)
from fedagg.runs._diff import config_diff, flatten

__all__ = [
    "KINDS", "ROUND_COLUMNS", "STATUSES", "TEXT_COLUMNS", "RunDB", "RunInfo", "config_diff",
    "flatten", "jsonable",
]  # fmt: skip

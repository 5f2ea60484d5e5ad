"""Simulation: a virtual-clock federation of many clients on one machine.

    from fedagg import sim
    result, run_id = sim.run_config({"rounds": 2, "data": {"name": "digits"}})

The same strategies and policies run here and in deployment; only the transport differs.
"""

from fedagg.config import DEFAULTS, load_config, resolve_config
from fedagg.policy import (
    Action,
    Applied,
    Arrival,
    AsyncPolicy,
    AsyncState,
    Commit,
    Dispatch,
    Dropout,
    Event,
    FedAMDPolicy,
    FedAMDState,
    Finish,
    Merge,
    Policy,
    PolicyContext,
    RoundStats,
    SetTimer,
    Start,
    SyncPolicy,
    SyncState,
    Timer,
    async_fedavg,
    fedasync,
    fedbuff,
    fedfix,
    sync_fedavg,
)
from fedagg.runs import RunDB, RunInfo
from fedagg.sim._engine import Executor, LocalExecutor, RoundRecord, SimResult, Simulation
from fedagg.sim._run import Built, build, format_table, plot_run, run_config
from fedagg.sim._system import Availability, Distribution, SystemModel, Timing

__all__ = [
    "DEFAULTS",
    "Action",
    "Applied",
    "Arrival",
    "AsyncPolicy",
    "AsyncState",
    "Availability",
    "Built",
    "Commit",
    "Dispatch",
    "Distribution",
    "Dropout",
    "Event",
    "Executor",
    "FedAMDPolicy",
    "FedAMDState",
    "Finish",
    "LocalExecutor",
    "Merge",
    "Policy",
    "PolicyContext",
    "RoundRecord",
    "RoundStats",
    "RunDB",
    "RunInfo",
    "SetTimer",
    "SimResult",
    "Simulation",
    "Start",
    "SyncPolicy",
    "SyncState",
    "SystemModel",
    "Timer",
    "Timing",
    "async_fedavg",
    "build",
    "fedasync",
    "fedbuff",
    "fedfix",
    "format_table",
    "load_config",
    "plot_run",
    "resolve_config",
    "run_config",
    "sync_fedavg",
]

"""Round and async policies: pure state machines that turn events into actions.

    from fedagg import policy
    p = policy.SyncPolicy(strategy, rounds=10, clients_per_round=5)

A policy never reads a clock or does I/O, so the same policy runs in the simulator
(:mod:`fedagg.sim`) and behind the deployment's server (:mod:`fedagg.deploy`); this package
sits below both. Its states are registered checkpoint types.
"""

from fedagg.policy._amd import FedAMDPolicy, FedAMDState
from fedagg.policy._async import AsyncPolicy, AsyncState
from fedagg.policy._async_recipes import async_fedavg, fedasync, fedbuff, fedfix, sync_fedavg
from fedagg.policy._events import (
    Action,
    AllAvailable,
    Applied,
    Arrival,
    Commit,
    Dispatch,
    Dropout,
    Event,
    Finish,
    MaskedMerge,
    Merge,
    Policy,
    PolicyContext,
    RoundStats,
    SecureContext,
    SecureReply,
    SecureRequest,
    SetTimer,
    Start,
    Timer,
    apply_or_skip,
    effective_weights,
    format_refusals,
    partial_epochs,
    refusal_reason,
    round_stats,
)
from fedagg.policy._private import DPSum, DPSumState, PrivatePolicy, PrivateState, dp_strategy
from fedagg.policy._secure import SecurePolicy, SecureRound, SecureState, stage_tag
from fedagg.policy._sync import SyncPolicy, SyncState

__all__ = [
    "Action",
    "AllAvailable",
    "Applied",
    "Arrival",
    "AsyncPolicy",
    "AsyncState",
    "Commit",
    "DPSum",
    "DPSumState",
    "Dispatch",
    "Dropout",
    "Event",
    "FedAMDPolicy",
    "FedAMDState",
    "Finish",
    "MaskedMerge",
    "Merge",
    "Policy",
    "PolicyContext",
    "PrivatePolicy",
    "PrivateState",
    "RoundStats",
    "SecureContext",
    "SecurePolicy",
    "SecureReply",
    "SecureRequest",
    "SecureRound",
    "SecureState",
    "SetTimer",
    "Start",
    "SyncPolicy",
    "SyncState",
    "Timer",
    "apply_or_skip",
    "async_fedavg",
    "dp_strategy",
    "effective_weights",
    "fedasync",
    "fedbuff",
    "fedfix",
    "format_refusals",
    "partial_epochs",
    "refusal_reason",
    "round_stats",
    "stage_tag",
    "sync_fedavg",
]

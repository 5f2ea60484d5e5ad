"""The curated public API is pinned: adding or removing a name is a deliberate act."""

from __future__ import annotations

import numpy as np

import fedagg

EXPECTED = {
    "fedagg": [
        "Aggregator", "ArrayTree", "ConfigError", "EmptyAggregate", "FedaggError",
        "InvalidWeight", "NonFiniteUpdate", "ParamSpec", "ServerState", "SpecError",
        "SpecMismatch", "StaleUpdate", "StateError", "Strategy", "TooFewUpdates", "Update",
        "UpdateError", "__version__", "aggregators", "attacks", "dumps", "errors", "load", "loads",
        "optimizers", "save", "spool", "staleness", "strategies", "transforms", "weighting",
    ],
    "fedagg.staleness": ["Staleness", "constant", "fedbuff_staleness", "hinge", "polynomial"],
    "fedagg.weighting": [
        "IntervalEstimator", "IntervalState", "Weighting", "all_clients", "examples", "fedau",
        "interval_limit", "known", "participating",
    ],
    "fedagg.aggregators": [
        "Aggregator", "Bulyan", "CenteredClipping", "ClipStep", "Composed", "CoordinateMedian",
        "CustomAggregator", "CustomState",
        "FlagAggregator", "GeometricMedian", "Krum", "Mean", "MeanState", "MemoryStore",
        "RowStore", "SpoolState", "StoreFactory", "TrimmedMean", "bulyan", "centered_clipping",
        "clip_step", "compose", "flag_aggregator", "geometric_median", "krum", "mean", "median",
        "multi_krum", "trimmed_mean", "weiszfeld_step",
        # trees and shards (fedagg.core.tree)
        "LeafThenMean", "MaskedMean", "Sharded", "ShardedState", "SketchKrum", "SketchState",
        "compensated_margin", "jl_dim", "leaf_then_mean", "reduce_tree", "sharded",
        "sketch_krum", "tree_centered_clipping", "tree_error_bound", "tree_rfa",
    ],
    "fedagg.spool": ["DiskStore", "disk"],
    "fedagg.secagg": [
        "CHUNK_WORDS", "Encoder", "MAX_WORDS", "PRIME", "SECRET_BYTES", "SHARE_BYTES",
        "add_mask", "combine", "mask", "split",
        "AdvertiseKeys", "ClientSession", "ConsistencyRequest", "ConsistencySignature",
        "ForwardedShares", "KeyDirectory", "MaskedInput", "RoundConfig", "ServerSession",
        "ShareKeys", "UnmaskRequest", "UnmaskResponse", "default_degree", "default_threshold",
        "neighbours",
        # shared by sim and deploy (issue 18 wiring)
        "CIPHERTEXT_BYTES", "RoundParams", "SecureClient", "WIRE_VERSION", "decode_message",
        "decode_reply", "decode_request", "encode_message", "message_stage", "public_identity",
        # a client's own minimums for a round (security review finding 4)
        "MIN_COHORT", "SecureExpectations", "check_params",
    ],
    "fedagg.attacks": [
        "ALIE", "ATTACK_KINDS", "IPM", "Attack", "Crafted", "Gaussian", "LabelFlip", "MinMax",
        "MinSum", "NoAttack", "RandomUniform", "SignFlip", "alie", "alie_z", "attack",
        "flip_labels", "gaussian", "honest_std", "ipm", "min_max", "min_max_gamma", "min_sum",
        "min_sum_gamma", "random_uniform", "search_gamma", "sign_flip",
    ],
    "fedagg.transforms": [
        "ClipNorm", "PreTransform", "RejectNonFinite", "clip_norm", "reject_nonfinite",
        "update_norm",
    ],
    "fedagg.optimizers": [
        "AdamState", "ChainState", "EmptyState", "Flavor", "OptState", "ServerOptimizer",
        "TraceState", "Transform", "adagrad", "adam", "chain", "momentum", "scale",
        "scale_by_adagrad", "scale_by_adam", "scale_by_yogi", "sgd", "trace", "yogi",
    ],
    "fedagg.strategies": [
        "ServerState", "Strategy", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi",
        "strategy",
    ],
    "fedagg.sim": [
        "Action", "Applied", "Arrival", "AsyncPolicy", "AsyncState", "Availability", "Built",
        "Commit", "DEFAULTS", "Dispatch", "Distribution", "Dropout", "Event", "Executor",
        "FedAMDPolicy", "FedAMDState", "Finish", "LocalExecutor", "Merge", "Policy",
        "PolicyContext", "RoundRecord", "RoundStats", "RunDB", "RunInfo", "SetTimer", "SimResult",
        "Simulation", "Start", "SyncPolicy", "SyncState", "SystemModel", "Timer", "Timing",
        "async_fedavg", "build", "fedasync", "fedbuff", "fedfix", "format_table",
        "load_config", "plot_run", "resolve_config", "run_config", "sync_fedavg",
    ],
    "fedagg.config": [
        "DEFAULTS", "Named", "aggregate_metrics", "build_aggregator", "build_algorithm",
        "build_data", "build_eval_data", "build_model", "build_policy", "build_strategy",
        "client_config", "config_errors", "json_schema", "load_config", "load_object",
        "metrics_aggregator", "resolve_config", "secure_noise", "to_toml",
    ],
    "fedagg.data": [
        "ArrayDataset", "ClientSummary", "DATASETS", "FederatedData", "PARTITIONS", "Seed",
        "SyntheticClients", "digits", "dirichlet", "federate", "format_histogram", "iid",
        "label_dirichlet", "label_skew", "load", "mnist1d", "mnist5k", "quantity_skew", "shards",
        "split", "synthetic",
    ],
    "fedagg.models": [
        "Activation", "Examples", "LogReg", "MLP", "Model", "Params", "ParamsLike", "StackedModel",
        "ArrayModel", "EvalData", "Initialized", "check_params", "from_arrays", "from_torch",
        "read_params", "with_init",
    ],
    "fedagg.clients": [
        "ClientAlgorithm", "FedAMD", "FedProx", "LabelFlip", "LocalSGD", "Result", "Scaffold",
        "Task", "TrainResult", "WorkerMomentum", "flip_labels", "scaffold_server_update",
        "BUILTIN_KEYS", "UserTrain", "fit_delta", "with_config", "LocalDP",
    ],
    "fedagg.hierarchy": [
        "AggregatorFailed", "Lease", "LeafThenMean", "Sharded", "ShmAggregator", "SketchKrum",
        "leaf_then_mean", "reduce_tree", "shard_bounds", "sharded", "sketch_krum",
        "tree_centered_clipping", "tree_error_bound", "tree_rfa",
    ],
    "fedagg.plane": [
        "SHM_PREFIX", "AggregatorFailed", "Lease", "ShmAggregator", "copy_peak", "fold_validated",
        "peak", "set_threads",
    ],
    "fedagg.privacy": [
        "ACCOUNTANTS", "DEFAULT_ORDERS", "DISTRIBUTED_ORDERS", "Accountant", "adaptive_clip",
        "add_gaussian_noise", "rdp_distributed_discrete_gaussian", "rdp_poisson_subsampled",
        "rdp_skellam",
        "clip_l2", "combined_noise_multiplier", "delta", "discrete_gaussian", "epsilon",
        "gaussian_delta", "gaussian_epsilon", "gaussian_noise", "local_dp",
        "noise_multiplier_for", "noised_unclipped_fraction", "rdp_subsampled_gaussian",
        "rdp_to_delta", "rdp_to_epsilon", "skellam", "update_noise_multiplier",
        "distributed_epsilon", "distributed_rdp", "integer_noise", "local_epsilon",
    ],
}  # fmt: skip


def test_all_is_pinned_and_resolvable() -> None:
    import importlib

    for modname, names in EXPECTED.items():
        mod = importlib.import_module(modname)
        assert sorted(mod.__all__) == sorted(names), modname
        for name in names:
            assert hasattr(mod, name), f"{modname}.{name}"


def test_errors_form_one_tree() -> None:
    for name in fedagg.errors.__all__:
        assert issubclass(getattr(fedagg.errors, name), fedagg.FedaggError)
    for cls in (fedagg.SpecMismatch, fedagg.StaleUpdate, fedagg.NonFiniteUpdate):
        assert issubclass(cls, fedagg.UpdateError)
    assert issubclass(fedagg.UpdateError, ValueError)
    assert issubclass(fedagg.ConfigError, ValueError)
    err = fedagg.StaleUpdate("c7", "trained from version 2")
    assert (err.client_id, err.reason) == ("c7", "trained from version 2")
    assert "'c7'" in str(err) and "version 2" in str(err)


def test_the_documented_minimal_api_works_exactly_as_written() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((4, 3)).astype(np.float32), np.zeros(3, np.float32)]
    params = [a.copy() for a in arrays]
    arrays_i = [np.ones((4, 3), np.float32), np.full(3, 2.0, np.float32)]
    n_i = 10

    spec = fedagg.ParamSpec.from_arrays(arrays)
    agg = fedagg.aggregators.mean()
    state = agg.init(spec)
    state = agg.fold(state, fedagg.Update(delta=arrays_i, weight=n_i))
    delta = agg.finalize(state)
    assert isinstance(delta, list)
    np.testing.assert_array_equal(delta[1], [2.0, 2.0, 2.0])
    opt = fedagg.optimizers.adam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9, flavor="flower")
    opt_state = opt.init(params)
    params, opt_state = opt.step(opt_state, params, delta)
    assert isinstance(params, list)
    assert params[1].shape == (3,)
    for make in (
        fedagg.optimizers.sgd,
        fedagg.optimizers.momentum,
        fedagg.optimizers.yogi,
        fedagg.optimizers.adagrad,
    ):
        o = make()
        s = o.init(params)
        p, s = o.step(s, params, delta)
        assert fedagg.ParamSpec.from_arrays(p) == spec

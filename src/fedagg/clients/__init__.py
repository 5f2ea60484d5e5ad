"""Client algorithms: how a client turns the global model and its data into an update.

The client-side counterpart of :mod:`fedagg.strategies`. Every algorithm trains any
:class:`fedagg.models.Model` and returns a :class:`TrainResult` whose ``delta`` is
``trained - start``, ready for ``fedagg.Update(delta=..., weight=result.num_examples)``::

    algo = fedagg.clients.LocalSGD(epochs=1, batch_size=10, lr=0.01)
    result, _ = algo.train(model, server.model, data, np.random.default_rng(seed))
    results = algo.train_many(model, server.model, datas, rngs)   # many clients at once

``train_many`` trains the clients on stacked parameters when the model supports it
(:class:`fedagg.models.LogReg`, :class:`fedagg.models.MLP`), giving the same results as a
loop of ``train`` up to float32 round-off, much faster.

:class:`UserTrain` runs your own ``train(params, data, task) -> Result`` function (see
:class:`Task`, :class:`Result` and docs/custom-code.md).

:class:`LabelFlip` wraps any of them into a data-poisoning client that trains on flipped
labels (the Byzantine clients of a simulation; also exported from :mod:`fedagg.attacks`).
:class:`LocalDP` wraps any of them into a local-DP client (clip + Gaussian noise on the
update before it leaves the client).
"""

from fedagg.clients._amd import FedAMD
from fedagg.clients._base import ClientAlgorithm, TrainResult
from fedagg.clients._label_flip import LabelFlip, flip_labels
from fedagg.clients._local_dp import LocalDP
from fedagg.clients._momentum import WorkerMomentum
from fedagg.clients._sgd import FedProx, LocalSGD, Scaffold, scaffold_server_update
from fedagg.clients._task import Result, Task
from fedagg.clients._user import BUILTIN_KEYS, UserTrain, fit_delta, with_config

__all__ = [
    "BUILTIN_KEYS",
    "ClientAlgorithm",
    "FedAMD",
    "FedProx",
    "LabelFlip",
    "LocalDP",
    "LocalSGD",
    "Result",
    "Scaffold",
    "Task",
    "TrainResult",
    "UserTrain",
    "WorkerMomentum",
    "fit_delta",
    "flip_labels",
    "scaffold_server_update",
    "with_config",
]

"""Models for simulation: fast numpy classifiers with exact gradients, and the protocols.

A model maps a parameter dict (``dict[str, NDArray[np.float32]]``) and a batch to the mean
cross-entropy and its gradient::

    model = fedagg.models.LogReg(num_features=60, num_classes=10)
    params = model.init(seed=0)
    loss, grads = model.loss_and_grad(params, x, y)
    test_loss, accuracy = model.evaluate(params, x_test, y_test)

:class:`LogReg` and :class:`MLP` also train many clients at once on stacked parameters
(:meth:`~LogReg.loss_and_grad_stacked`), which :mod:`fedagg.clients` uses. A PyTorch adapter
is in :mod:`fedagg.models.torch` (optional extra ``torch``; importing this package does not
import torch). Your own model: :func:`from_torch`, :func:`from_arrays`, :func:`read_params`
(``.npz``, ``.safetensors``, torch state_dict) and :func:`with_init` (see docs/custom-code.md).
"""

from fedagg.models._numpy import MLP, Activation, LogReg
from fedagg.models._types import Examples, Model, Params, ParamsLike, StackedModel
from fedagg.models._user import (
    ArrayModel,
    EvalData,
    Initialized,
    check_params,
    from_arrays,
    from_torch,
    read_params,
    with_init,
)

__all__ = [
    "MLP",
    "Activation",
    "ArrayModel",
    "EvalData",
    "Examples",
    "Initialized",
    "LogReg",
    "Model",
    "Params",
    "ParamsLike",
    "StackedModel",
    "check_params",
    "from_arrays",
    "from_torch",
    "read_params",
    "with_init",
]

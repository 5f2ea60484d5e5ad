"""One-line strategy recipes: pre-transforms + aggregator + server optimizer.

>>> import fedagg
>>> s = fedagg.strategies.fedadam(lr=0.1, flavor="flower")
>>> s.name, s.optimizer.name
('fedadam', 'adam')
"""

from collections.abc import Iterable
from typing import Any

from fedagg.core import optim
from fedagg.core.aggregate import Aggregator, PreTransform
from fedagg.core.optim import Flavor
from fedagg.core.strategy import ServerState as ServerState
from fedagg.core.strategy import Strategy as Strategy
from fedagg.core.strategy import __all__ as __all__
from fedagg.core.strategy import fedadam as fedadam
from fedagg.core.strategy import fedavg as fedavg
from fedagg.core.strategy import fedavgm as fedavgm
from fedagg.core.strategy import fedyogi as fedyogi
from fedagg.core.strategy import strategy as strategy


def fedadagrad(
    lr: float = 0.1,
    beta1: float | None = None,
    tau: float = 1e-3,
    flavor: Flavor = "paper",
    *,
    aggregator: Aggregator[Any] | None = None,
    pre: Iterable[PreTransform] = (),
) -> Strategy:
    """FedAdagrad (Reddi et al. 2021). ``beta1=None`` is the flavor's default: 0.9 for
    ``"paper"`` (as FedAdam and FedYogi), 0 for ``"flower"`` (Flower's FedAdagrad)."""
    opt = optim.adagrad(lr, beta1, tau, flavor)
    return strategy("fedadagrad", opt, aggregator=aggregator, pre=pre)

"""One-line strategy recipes: pre-transforms + aggregator + server optimizer.

>>> import fedagg
>>> s = fedagg.strategies.fedadam(lr=0.1, flavor="flower")
>>> s.name, s.optimizer.name
('fedadam', 'adam')
"""

from fedagg.core.strategy import ServerState as ServerState
from fedagg.core.strategy import Strategy as Strategy
from fedagg.core.strategy import __all__ as __all__
from fedagg.core.strategy import fedadagrad as fedadagrad
from fedagg.core.strategy import fedadam as fedadam
from fedagg.core.strategy import fedavg as fedavg
from fedagg.core.strategy import fedavgm as fedavgm
from fedagg.core.strategy import fedyogi as fedyogi
from fedagg.core.strategy import strategy as strategy

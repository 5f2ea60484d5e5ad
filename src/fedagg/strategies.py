"""One-line strategy recipes: pre-transforms + aggregator + server optimizer.

>>> import fedagg
>>> s = fedagg.strategies.fedadam(lr=0.1, flavor="flower")
>>> s.name, s.optimizer.name
('fedadam', 'adam')
"""

from fedagg.core.strategy import *  # noqa: F403
from fedagg.core.strategy import __all__ as __all__

"""Staleness functions for asynchronous policies (FedAsync, FedBuff).

>>> from fedagg import staleness
>>> staleness.polynomial(0.5)(3)
0.5
"""

from fedagg.core.staleness import *  # noqa: F403
from fedagg.core.staleness import __all__ as __all__

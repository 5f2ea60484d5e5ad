"""Participation-aware aggregation weights: FedAU and its baselines.

>>> from fedagg import weighting
>>> est = weighting.IntervalEstimator(cutoff=10)
>>> round(weighting.interval_limit(0.5, 10), 4)
1.998
"""

from fedagg.core.participation import *  # noqa: F403
from fedagg.core.participation import __all__ as __all__

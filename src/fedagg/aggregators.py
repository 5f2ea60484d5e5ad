"""Aggregators (commutative monoids over client updates) and their composition.

>>> import numpy as np, fedagg
>>> spec = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32)])
>>> agg = fedagg.aggregators.mean()
>>> s = agg.init(spec)
>>> s = agg.fold(s, fedagg.Update(delta=[np.ones(3, np.float32)], weight=2.0))
>>> s = agg.fold(s, fedagg.Update(delta=[np.zeros(3, np.float32)], weight=2.0))
>>> agg.finalize(s)[0].tolist()
[0.5, 0.5, 0.5]
"""

from fedagg.core.aggregate import Aggregator, Composed, Mean, MeanState, compose, mean

__all__ = ["Aggregator", "Composed", "Mean", "MeanState", "compose", "mean"]

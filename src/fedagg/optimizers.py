"""Server optimizers and the transforms they are chained from.

>>> import numpy as np, fedagg
>>> opt = fedagg.optimizers.sgd(lr=1.0)
>>> params = [np.zeros(2, np.float32)]
>>> state = opt.init(params)
>>> params, state = opt.step(state, params, [np.ones(2, np.float32)])
>>> params[0].tolist()
[1.0, 1.0]
"""

from fedagg.core.optim import *  # noqa: F403
from fedagg.core.optim import __all__ as __all__

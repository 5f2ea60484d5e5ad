"""Byzantine attacks for simulations: sign flipping, Gaussian noise, ALIE, IPM, Min-Max,
Min-Sum, uniform random vectors, and label flipping (data poisoning).

>>> import numpy as np
>>> from fedagg import attacks
>>> round(attacks.alie_z(25, 5, "paper"), 4), round(attacks.alie_z(25, 5, "code"), 4)
(0.4677, 0.2533)
>>> attacks.ipm(np.array([[1.0, 2.0], [3.0, 4.0]]), eps=0.5)
array([-1. , -1.5])
"""

from fedagg.core.attacks import *  # noqa: F403
from fedagg.core.attacks import __all__ as __all__

"""clipguard-neural-cleanse: a third-party clipguard scanner (per-class Neural Cleanse).

The package is an ordinary clipguard plugin: :mod:`clipguard_nc.plugin` registers
:class:`~clipguard_nc.scanner.NeuralCleanseScanner` through the ``clipguard`` entry-point
group. :mod:`clipguard_nc.anomaly` holds the MAD anomaly index and the verdict rule (pure
Python, no torch), :mod:`clipguard_nc.inversion` the batched per-class trigger inversion.
"""

from __future__ import annotations

__version__ = "0.1.0"

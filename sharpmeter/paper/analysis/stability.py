r"""The edge of stability: sharpness against the ``2 / lr`` a step of the optimizer can bear.

A quadratic of curvature :math:`S` is descended by steps of size ``lr`` only while
:math:`S < 2 / \mathrm{lr}`; Cohen et al. (2021) found full-batch training raising sharpness to
that threshold and hovering there. The **stability ratio**

.. math:: r = S \, \mathrm{lr} / 2

is 1 on the threshold; for critical sharpness :math:`S = \lambda_c = 2 / \eta_c` it is
``lr / eta_c``, the meter's ``stability_ratio`` column: above 1 the next step raises the probe
loss. At the end of a run :func:`final_stability` summarises it like a final value, by
:func:`~sharpmeter.paper.analysis.robust.robust_final` (one spike cannot move it; the interval
widens for correlated measurements).

**Tolerance.** A run sits *at* the edge when its ratio's interval lies within
:data:`EDGE_BAND` = [1/2, 2], a factor of 2 either way: below 1/2 the step could double and
still descend (comfortably stable); above 2 every step overshoots the threshold twice over, which
a run cannot keep up without diverging, unless its sharpness is not the curvature along its
steps. The band is an equivalence margin: an interval inside it shows the run is at the edge,
one outside it shows that it is not, one across a border shows neither.

>>> t = np.linspace(0, 1, 50)
>>> final = final_stability(t, np.full(50, 400.0), t, np.full(50, 5e-3))
>>> final.median, at_edge(final.ci)
(1.0, True)
"""

from __future__ import annotations

import numpy as np

from sharpmeter.paper.analysis.robust import RobustFinal, robust_final

EDGE_BAND = (0.5, 2.0)


def stability_ratio(
    t: np.ndarray, s: np.ndarray, t_lr: np.ndarray, lr: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(t, S lr / 2)`` where a sharpness and a positive learning rate were both logged (one
    row carries both: their ``t`` are the same numbers). A learning rate of 0 or below means
    measured without an optimizer, with no threshold to compare to."""
    positive = lr > 0
    shared, in_s, in_lr = np.intersect1d(t, t_lr[positive], return_indices=True)
    return shared, s[in_s] * lr[positive][in_lr] / 2


def final_stability(
    t: np.ndarray, s: np.ndarray, t_lr: np.ndarray, lr: np.ndarray, fraction: float = 0.2
) -> RobustFinal:
    """The stability ratio over the last ``fraction`` of training time, robustly (raises
    ``ValueError`` when no point has both a sharpness and a positive learning rate)."""
    shared, ratio = stability_ratio(t, s, t_lr, lr)
    return robust_final(shared, ratio, fraction)


def at_edge(ci: tuple[float, float], band: tuple[float, float] = EDGE_BAND) -> bool | None:
    """True when the interval lies inside ``band``, False when outside it, else None (it crosses
    a border of the band, or is NaN: too few points for an interval).

    >>> at_edge((0.9, 1.2)), at_edge((0.05, 0.2)), at_edge((0.3, 0.8))
    (True, False, None)
    """
    lo, hi = ci
    if band[0] <= lo and hi <= band[1]:
        return True
    if hi < band[0] or lo > band[1]:
        return False
    return None

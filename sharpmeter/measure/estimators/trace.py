r"""Stochastic trace estimation: Hutchinson and Hutch++, each with a standard error.

Both use Rademacher probes :math:`z \in \{\pm 1\}^n` (:math:`\mathbb E[zz^\top] = I`, so
:math:`\mathbb E[z^\top H z] = \mathrm{tr}\,H`) drawn from a private CPU generator: the same
probes on every device and rank, and the global RNG untouched. The budget is fixed in advance;
stopping on the running mean would bias the estimate. An operator that multiplies several
vectors per call (``products_per_call``) gets the probes in blocks of that size: the same
probes and, to rounding, the same estimate.

Example::

    r = sm.hutchinson(op, num_matvecs=64, seed=0)
    print(f"tr H = {r.value:.3g} +/- {r.stderr:.2g} ({r.num_matvecs} HVPs)")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sharpmeter.measure.checks import check_positive_int
from sharpmeter.measure.estimators._operator import CountingOperator, LinearOperator


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its quality.

    Attributes:
        value: the estimate of :math:`\\mathrm{tr}\\,H`.
        stderr: its standard error, :math:`s / \\sqrt{m}` over the :math:`m` stochastic samples
            (Hutch++: of the deflated remainder; the low-rank part is exact).
        num_matvecs: operator products spent.
        samples: the stochastic quadratic forms, for further statistics.
    """

    value: float
    stderr: float
    num_matvecs: int
    samples: torch.Tensor


def hutchinson(
    operator: LinearOperator | torch.Tensor, num_matvecs: int = 64, seed: int = 0
) -> TraceResult:
    r"""Hutchinson's estimator :math:`\frac1m \sum_{i=1}^m z_i^\top H z_i`.

    Unbiased, with variance :math:`\frac2m(\lVert H\rVert_F^2 - \sum_i H_{ii}^2)` for
    Rademacher probes; the reported standard error is the sample estimate of its square root.

    Args:
        operator: a square operator or dense matrix.
        num_matvecs: budget of products, one per probe, at least 2 for a standard error.
        seed: seed of the private probe generator.
    """
    check_positive_int("num_matvecs", num_matvecs, minimum=2)
    op = CountingOperator(operator)
    generator = torch.Generator().manual_seed(seed)
    samples = [
        form for z, hz in _probe_blocks(op, num_matvecs, generator) for form in _forms(z, hz)
    ]
    return _result(0.0, torch.tensor(samples, dtype=torch.float64), op.num_matvecs)


def hutchpp(
    operator: LinearOperator | torch.Tensor, num_matvecs: int = 64, seed: int = 0
) -> TraceResult:
    r"""Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace of a low-rank part plus
    Hutchinson on the rest.

    With :math:`s = \lfloor m/3 \rfloor` and :math:`g = m - 2s`: sketch :math:`Y = HS` for
    Rademacher :math:`S \in \mathbb R^{n \times s}`, orthonormalise :math:`Q = \mathrm{qr}(Y)`,
    then

    .. math:: \mathrm{tr}\,H \approx \mathrm{tr}(Q^\top H Q)
              + \frac1g \sum_{i=1}^g \tilde g_i^\top H \tilde g_i,
              \qquad \tilde g_i = (I - QQ^\top) g_i,

    which spends :math:`s + s + g = m` products. When :math:`H` has a few dominant eigenvalues
    (a typical Hessian) the remainder, and so the error, is much smaller than plain Hutchinson's.

    ``stderr`` comes from the :math:`g` remainder samples alone (``samples``), so at a small
    budget it is itself rough: a 95% interval is :math:`\pm t_{g-1}` standard errors (3.18 at
    :math:`m = 8`, where :math:`g = 4`), not :math:`\pm 2`; over 400 seeds of a matrix with
    three outliers, :math:`\pm 2` standard errors held the trace in 62% at :math:`m = 4`, 77%
    at 8 and 92% at 32.

    Args:
        operator: a square operator or dense matrix.
        num_matvecs: total budget :math:`m \ge 4` (so that :math:`g \ge 2`).
        seed: seed of the private probe generator.
    """
    check_positive_int("num_matvecs", num_matvecs, minimum=4)
    op = CountingOperator(operator)
    generator = torch.Generator().manual_seed(seed)
    sketch_size = num_matvecs // 3
    q, _ = torch.linalg.qr(op @ _rademacher(op, sketch_size, generator))
    low_rank = float(torch.sum(q * (op @ q)))
    blocks = _probe_blocks(
        op, num_matvecs - 2 * sketch_size, generator, project=lambda g: g - q @ (q.T @ g)
    )
    remainder = [form for g, hg in blocks for form in _forms(g, hg)]
    return _result(low_rank, torch.tensor(remainder, dtype=torch.float64), op.num_matvecs)


def _probe_blocks(
    op: CountingOperator,
    count: int,
    generator: torch.Generator,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(Z, HZ)`` for ``count`` Rademacher probes (each ``project``-ed), in blocks of the
    operator's ``products_per_call``, one call each. Each probe is drawn as a vector of its
    own, so the probes are the same whatever the block sizes."""
    for size in op.blocks(count):
        z = torch.cat([_rademacher(op, 1, generator) for _ in range(size)], dim=1)
        if project is not None:
            z = torch.stack([project(column) for column in z.T], dim=1)
        yield z, op.times_columns(z)


def _forms(z: torch.Tensor, hz: torch.Tensor) -> list[float]:
    """:math:`z_i^\\top H z_i` for the columns of ``z`` and ``hz = HZ``."""
    return [float(a @ b) for a, b in zip(z.T, hz.T, strict=True)]


def _rademacher(op: CountingOperator, columns: int, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (op.dim, columns), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(device=op.device, dtype=op.dtype)


def _result(exact_part: float, samples: torch.Tensor, num_matvecs: int) -> TraceResult:
    return TraceResult(
        value=exact_part + float(samples.mean()),
        stderr=float(samples.std(correction=1)) / math.sqrt(samples.numel()),
        num_matvecs=num_matvecs,
        samples=samples,
    )

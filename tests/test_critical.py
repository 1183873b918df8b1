"""critical_sharpness on quadratics, where lambda_c = d'Hd / d'g exactly, and on one-parameter
losses that blow up, never rise, or cross the start more than once."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from conftest import Quadratic, causal_lm_loss, float64_gpt2, quadratic_loss, token_batch

import sharpmeter as sm
from sharpmeter.measure.linesearch import PREDICTIONS, _crossing
from sharpmeter.measure.loss import ProbeLoss

K = 4
TOLERANCE = 2.0**-K
CHECK_BELOW = 2  # critical_sharpness's default
ALONG = -torch.ones(1, dtype=torch.float64)  # with theta = 0 at the start, theta - eta d = eta


class Line(torch.nn.Module):
    """One parameter theta = 0; with direction ``ALONG`` the loss at step eta is ``along(eta)``."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, _batch) -> torch.Tensor:
        return self.along(self.theta).sum()

    def along(self, eta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EdgeOfDomain(Line):
    """-eta + 0 * sqrt(1 - eta): falls linearly, then NaN from eta = 1 on, never a finite rise."""

    def along(self, eta):
        return -eta + 0 * torch.sqrt(1 - eta)


class BumpBeforeEdge(EdgeOfDomain):
    """EdgeOfDomain with a finite rise (+10) on [0.9, 1) just before the NaN."""

    def along(self, eta):
        return super().along(eta) + 10 * (eta >= 0.9)


class FlattensThenNaN(Line):
    """exp(-eta) - 1: falls and flattens at -1, below the start for good, NaN from ``edge`` on."""

    def __init__(self, edge: float) -> None:
        super().__init__()
        self.edge = edge

    def along(self, eta):
        return torch.where(eta < self.edge, torch.expm1(-eta), torch.nan)


class Wiggle(Line):
    """eta (eta - 0.1)(eta - 0.3)(eta - 5): above the start on (0.1, 0.3) and beyond 5, below it
    on (0, 0.1) and (0.3, 5), so eta_c = 0.1 and 5 is a later crossing."""

    def along(self, eta):
        return eta * (eta - 0.1) * (eta - 0.3) * (eta - 5)


def exact_critical(quadratic: Quadratic, d: torch.Tensor) -> float:
    return float(d @ quadratic.hessian @ d / (d @ quadratic.gradient()))


def descent_direction(quadratic: Quadratic, seed: int) -> torch.Tensor:
    d = torch.randn(
        quadratic.theta.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return d if d @ quadratic.gradient() > 0 else -d


@pytest.mark.parametrize("seed", range(5))
def test_quadratic_lambda_c_is_directional_sharpness(quadratic, seed):
    d = descent_direction(quadratic, seed)
    exact = exact_critical(quadratic, d)
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=0.37, precision_bits=K)
    assert result.status == "ok"
    assert result.lo < 2 / exact <= result.hi
    assert 1 - result.lo / result.hi <= TOLERANCE
    assert result.value == pytest.approx(exact, rel=TOLERANCE)
    assert result.slope == pytest.approx(float(d @ quadratic.gradient()), rel=1e-12)


def test_gradient_direction_gives_the_rayleigh_quotient(quadratic):
    g = quadratic.gradient()
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, g, eta0=1.0)
    assert result.value == pytest.approx(float(g @ quadratic.hessian @ g / (g @ g)), rel=TOLERANCE)
    op = sm.HessianOperator(quadratic, quadratic_loss, None)
    assert sm.directional_sharpness(op, g).value == pytest.approx(
        float(g @ quadratic.hessian @ g / (g @ g)), rel=1e-12
    )


@pytest.mark.parametrize("scale", [0.25, 3.0, 100.0])
def test_lambda_c_scales_with_the_direction(quadratic, scale):
    d = descent_direction(quadratic, 0)
    base = sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=0.1, precision_bits=8)
    scaled = sm.critical_sharpness(
        quadratic, quadratic_loss, None, scale * d, eta0=0.1, precision_bits=8
    )
    assert scaled.value == pytest.approx(scale * base.value, rel=2 * 2.0**-8)


@pytest.mark.parametrize("factor", [0.55, 0.9, 1.1, 1.9])
def test_forward_count_with_a_good_warm_start(quadratic, factor):
    """The quadratic model's prediction is exact here: base, warm start, the two steps either
    side of the prediction and the checks; by doubling/halving and bisection, b more - 1."""
    d = descent_direction(quadratic, 1)
    eta_c = 2 / exact_critical(quadratic, d)

    def search(eta0: float, predictions: int = PREDICTIONS):
        return sm.critical_sharpness(
            quadratic, quadratic_loss, None, d, eta0=eta0, precision_bits=K, predictions=predictions
        )

    predicted, plain = search(factor * eta_c), search(factor * eta_c, predictions=0)
    assert predicted.num_forward == 1 + 1 + 2 + CHECK_BELOW
    assert plain.num_forward == 1 + 2 + K + CHECK_BELOW
    for result in (predicted, plain):
        assert result.status == "ok" and result.lo < eta_c <= result.hi
        assert 1 - result.lo / result.hi <= TOLERANCE
    cold, cold_plain = search(1e-6 * eta_c), search(1e-6 * eta_c, predictions=0)
    assert plain.num_forward < cold.num_forward < cold_plain.num_forward
    assert cold.value == pytest.approx(predicted.value, rel=2 * TOLERANCE)


def test_nondescent_direction_stops_after_one_forward(quadratic):
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, -quadratic.gradient())
    assert result.status == "nondescent" and result.num_forward == 1
    assert math.isnan(result.value)


class _QuadraticMatVecFirst(Quadratic):
    """The same loss, its rounding another: H theta first."""

    def forward(self, _batch) -> torch.Tensor:
        return 0.5 * self.theta @ (self.hessian @ self.theta) - self.b @ self.theta


def test_without_the_gradient_an_ascent_direction_is_never_ok(quadratic):
    """check_descent=False along the ascent direction: halving down to where the parameters
    hardly move, a step whose loss rounded to L(theta) counted as a dip, and the 'crossing'
    there was ok with lambda_c 1e17."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=generator))
    hessian = q @ torch.diag(torch.linspace(0.5, 10, 10, dtype=torch.float64)) @ q.T
    b = torch.randn(10, dtype=torch.float64, generator=generator)
    theta = torch.randn(10, dtype=torch.float64, generator=generator)
    model = _QuadraticMatVecFirst(hessian, b, theta)
    result = sm.critical_sharpness(
        model, quadratic_loss, None, -model.gradient(), check_descent=False
    )
    assert result.status == "unresolved" and math.isnan(result.value)
    along = sm.critical_sharpness(
        quadratic, quadratic_loss, None, quadratic.gradient(), check_descent=False
    )
    exact = sm.critical_sharpness(quadratic, quadratic_loss, None, quadratic.gradient())
    assert along.status == exact.status == "ok"
    assert along.value == pytest.approx(exact.value, rel=TOLERANCE)


def test_a_downward_search_out_of_forwards_is_not_converged(quadratic):
    """A descent direction (d'g > 0) whose halving from far above runs out of forwards was
    called nondescent."""
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, quadratic.gradient(), eta0=1e20)
    assert result.slope > 0
    assert result.status == "not_converged" and math.isnan(result.lo) and result.hi > 0


def test_given_gradient_is_used_for_the_descent_check(quadratic):
    g = quadratic.gradient()
    result = sm.critical_sharpness(quadratic, quadratic_loss, None, g, gradient=-g)
    assert result.status == "nondescent"


def test_no_increase_on_a_linear_loss_is_bounded():
    model = Quadratic(
        torch.zeros(3, 3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    result = sm.critical_sharpness(
        model, quadratic_loss, None, -torch.ones(3, dtype=torch.float64), max_forward=20
    )
    assert result.status == "no_increase" and result.num_forward == 20
    assert math.isnan(result.value) and result.lo > 0


def test_negative_curvature_direction_never_raises_the_loss(quadratic):
    model = Quadratic(-quadratic.hessian, quadratic.b, quadratic.theta.detach())
    d = descent_direction(model, 2)
    assert sm.critical_sharpness(model, quadratic_loss, None, d).status == "no_increase"


def test_non_finite_base_loss():
    model = Quadratic(
        torch.eye(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
    )
    result = sm.critical_sharpness(
        model, lambda m, b: m(b) * float("nan"), None, torch.ones(2, dtype=torch.float64)
    )
    assert result.status == "nonfinite" and result.num_forward == 1


def embedding_model_with_row(value: float) -> tuple[torch.nn.Module, tuple, torch.Tensor]:
    """A float64 embedding model whose probe never looks up row 9, which holds ``value``; its
    SGD direction (the gradient, zero on row 9)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 1)
    ).double()
    with torch.no_grad():
        model[0].weight[9, 0] = value
    batch = (torch.randint(0, 9, (16, 2)), torch.randn(16, 1, dtype=torch.float64))
    mse(model, batch).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, batch, sm.update_direction(optimizer)


def mse(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def test_a_nan_parameter_the_loss_never_uses_is_measured_and_put_back():
    """A NaN in an embedding row the probe never looks up leaves the loss finite: it is the
    same measurement as with a finite value there (it errored, 'not restored bit-identically',
    NaN being unequal to itself, then overflowed in the rounding bounds)."""
    model, batch, direction = embedding_model_with_row(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    result = sm.critical_sharpness(model, mse, batch, direction)
    finite, _, finite_direction = embedding_model_with_row(0.5)
    reference = sm.critical_sharpness(finite, mse, batch, finite_direction)
    assert result.status == reference.status == "ok"
    assert result.value == reference.value
    assert all(
        torch.equal(a.view(torch.int64), p.detach().view(torch.int64))
        for a, p in zip(before, model.parameters(), strict=True)
    )


def test_a_loss_that_turns_nan_without_rising_is_nonfinite():
    """NaN counts as a rise while searching, but the bracket's top is a blow-up, not a crossing:
    1 only bounds eta_c from above."""
    result = sm.critical_sharpness(
        EdgeOfDomain(), quadratic_loss, None, ALONG, eta0=0.3, precision_bits=K
    )
    assert result.status == "nonfinite"
    assert result.lo < 1.0 <= result.hi and 1 - result.lo / result.hi <= TOLERANCE
    assert math.isnan(result.value) and math.isnan(result.eta_c)


def test_a_finite_rise_before_the_nan_is_ok():
    result = sm.critical_sharpness(
        BumpBeforeEdge(), quadratic_loss, None, ALONG, eta0=0.3, precision_bits=K
    )
    assert result.status == "ok"
    assert result.lo < 0.9 <= result.hi < 1.0
    assert result.value == pytest.approx(2 / 0.9, rel=TOLERANCE)


@pytest.mark.parametrize(
    ("edge", "max_forward", "status"),
    [(1e6, 64, "nonfinite"), (4e18, 64, "no_increase"), (4e18, 128, "nonfinite")],
)
def test_a_loss_that_never_rises_is_never_ok(edge, max_forward, status):
    """Issue #12: flat below the start, NaN only at 4e18, was ok with lambda_c = 5e-19."""
    result = sm.critical_sharpness(
        FlattensThenNaN(edge),
        quadratic_loss,
        None,
        ALONG,
        precision_bits=K,
        max_forward=max_forward,
    )
    assert result.status == status
    assert math.isnan(result.value) and math.isnan(result.eta_c)
    if status == "nonfinite":
        assert result.lo < edge <= result.hi


def test_a_budget_too_small_to_converge_is_not_converged(quadratic):
    d = descent_direction(quadratic, 1)
    eta_c = 2 / exact_critical(quadratic, d)
    # Without predictions 1 + 1 + 20 forwards bracket eta_c from 1e-6 eta_c; two are left for
    # the bisection. With them, the base and the warm start above eta_c leave one step of the
    # straddle, which finds the lower end.
    result = sm.critical_sharpness(
        quadratic,
        quadratic_loss,
        None,
        d,
        eta0=1e-6 * eta_c,
        precision_bits=K,
        max_forward=24,
        predictions=0,
    )
    assert result.status == "not_converged" and result.num_forward == 24
    assert math.isnan(result.value) and math.isnan(result.eta_c)
    assert math.isfinite(result.lo) and math.isfinite(result.hi)
    assert result.lo < eta_c <= result.hi and 1 - result.lo / result.hi > TOLERANCE
    predicted = sm.critical_sharpness(
        quadratic, quadratic_loss, None, d, eta0=1.5 * eta_c, precision_bits=K, max_forward=3
    )
    assert predicted.status == "not_converged" and predicted.num_forward == 3
    assert predicted.lo < eta_c <= predicted.hi == 1.5 * eta_c


def test_an_unchecked_bracket_is_not_converged(quadratic):
    """A converged bracket is ok only once the steps below it were checked."""
    d = descent_direction(quadratic, 1)
    eta0 = 1.1 * 2 / exact_critical(quadratic, d)
    short = sm.critical_sharpness(
        quadratic, quadratic_loss, None, d, eta0=eta0, precision_bits=K, max_forward=1 + 1 + 2
    )
    assert short.status == "not_converged" and math.isnan(short.value)
    assert 1 - short.lo / short.hi <= TOLERANCE
    enough = sm.critical_sharpness(
        quadratic,
        quadratic_loss,
        None,
        d,
        eta0=eta0,
        precision_bits=K,
        max_forward=1 + 1 + 2 + CHECK_BELOW,
    )
    assert enough.status == "ok" and (enough.lo, enough.hi) == (short.lo, short.hi)


@pytest.mark.parametrize("eta0", [1.0, 6.0])
def test_a_warm_start_past_the_first_crossing_finds_it(eta0):
    """From inside the dip (1) or above the later crossing (6), the bracket is around 5 until
    the check below steps into the rise on (0.1, 0.3)."""
    result = sm.critical_sharpness(
        Wiggle(), quadratic_loss, None, ALONG, eta0=eta0, precision_bits=K
    )
    assert result.status == "ok"
    assert result.lo < 0.1 <= result.hi and 1 - result.lo / result.hi <= TOLERANCE
    assert result.value == pytest.approx(2 / 0.1, rel=TOLERANCE)
    unchecked = sm.critical_sharpness(
        Wiggle(), quadratic_loss, None, ALONG, eta0=eta0, precision_bits=K, check_below=0
    )
    assert unchecked.lo < 5 <= unchecked.hi and unchecked.num_forward < result.num_forward


def test_no_budget_left_after_a_check_rose_is_not_converged():
    """Without predictions 1 + 4 forwards bracket 5 from 1, K bisect it, and the check at 1/4
    rises: none is left to search below 1/4."""
    result = sm.critical_sharpness(
        Wiggle(),
        quadratic_loss,
        None,
        ALONG,
        eta0=1.0,
        precision_bits=K,
        max_forward=1 + 4 + K + 1,
        predictions=0,
    )
    assert result.status == "not_converged" and math.isnan(result.value)
    assert math.isnan(result.lo) and result.hi == 0.25


class ShallowDip(torch.nn.Module):
    """1 - s eta + eta^2 in float32 along theta = eta: a dip 1e-19 deep (s = 1e-9) at
    eta_c = s, far below float32's rounding of the loss (1.2e-7). Its float32 loss rises from
    eta ~ 3e-4 on, where rounding has swallowed the -s eta."""

    def __init__(self, slope: float = 1e-9) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(1))
        self.slope = slope

    def forward(self, _batch) -> torch.Tensor:
        return (1 - self.slope * self.theta + self.theta**2).sum()


@pytest.mark.parametrize("eta0", [1e-6, 1e-3, 1.0])
def test_a_dip_shallower_than_rounding_is_unresolved_not_a_crossing(eta0):
    """Rounding's rise at 3e-4 once made this ok with lambda_c ~ 7e3 (the truth is 2e9)."""
    result = sm.critical_sharpness(
        ShallowDip(), quadratic_loss, None, -torch.ones(1), eta0=eta0, precision_bits=K
    )
    assert result.slope == pytest.approx(1e-9)
    assert result.status == "unresolved" and math.isnan(result.value)


def test_a_resolvable_dip_in_float32_is_found_from_any_warm_start():
    """A dip deep enough to resolve (s = 1e-2) is found from warm starts far below rounding."""
    for eta0 in (1e-12, 1e-8, 1e-4):
        result = sm.critical_sharpness(
            ShallowDip(slope=1e-2), quadratic_loss, None, -torch.ones(1), eta0=eta0
        )
        assert result.status == "ok" and result.value == pytest.approx(2 / 1e-2, rel=TOLERANCE)


class CoarseBf16(torch.nn.Module):
    """bf16 parameters a = 256, stored in steps of 1 below it, and b = 0, stored finely; the
    float32 loss 1 + (a - 256) - c_b b + k/2 |theta - theta0|^2."""

    def __init__(self, c_b: float, k: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([256.0, 0.0], dtype=torch.bfloat16))
        self.c_b, self.k = c_b, k

    def forward(self, _batch) -> torch.Tensor:
        moved = self.theta.float() - torch.tensor([256.0, 0.0])
        return 1 + moved @ torch.tensor([1.0, -self.c_b]) + self.k / 2 * moved @ moved


# (c_b, k, d_b, lambda_c): along d = (1, d_b) the crossing is at 2 d'g / d'Hd. Below eta = 0.5
# only b moves as stored, and alone it raises the loss. In the second, b carries 90% of |d|^2,
# so a step that leaves a where it is is within half of eta d in norm: only the gradient
# weighted test, |g'e| <= eta d'g / 2, tells it is not the step asked for.
COARSE = {"norm": (0.1, 0.9, 1.0, 2.0), "slope": (0.01, 0.097, 3.0, 1.0)}


@pytest.mark.parametrize("case", COARSE)
@pytest.mark.parametrize("eta0", [1e-3, 0.1, 1.0, 3.0])
def test_steps_the_parameters_cannot_store_decide_nothing(case, eta0):
    """Before, every warm start gave lambda_c ~ 3e6 (norm) or 1e6 (slope) from steps that
    moved b alone; the L2 test alone gave nondescent on the second."""
    c_b, k, d_b, exact = COARSE[case]
    direction = torch.tensor([1.0, d_b])
    result = sm.critical_sharpness(CoarseBf16(c_b, k), quadratic_loss, None, direction, eta0=eta0)
    assert result.status == "ok" and result.value == pytest.approx(exact, rel=0.1)


class Offset(torch.nn.Module):
    """One float64 parameter x = 0 under a float32 loss K + f(eta), K = 1.26e6: float32's
    rounding of the loss is ~1, so steps with d'g eta below ~1 do not resolve it."""

    def __init__(self) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


OFFSET_LOSSES = {
    "quadratic": (lambda m, _: (1.26e6 + 0.5 * (m.x - 1) ** 2).sum().float(), {"predictions": 0}),
    "quartic": (lambda m, _: (1.26e6 - m.x + m.x**4 / 8).sum().float(), {}),
}


@pytest.mark.parametrize("shape", OFFSET_LOSSES)
@pytest.mark.parametrize("eta0", [2.3, 3.0, 8.0, 100.0])
def test_a_crossing_just_above_the_resolution_is_found_from_above(shape, eta0):
    """The crossing at 2 lies within one halving of the resolution (~1.2): halving from above
    stepped below it and stopped with nondescent; the lowest step that resolves is tried."""
    loss_fn, options = OFFSET_LOSSES[shape]
    direction = -torch.ones(1, dtype=torch.float64)
    result = sm.critical_sharpness(Offset(), loss_fn, None, direction, eta0=eta0, **options)
    # The loss near 2 moves by less than its rounding (0.125 at 1.26e6): a bracket a few
    # percent above it.
    assert result.status == "ok" and result.value == pytest.approx(1, rel=0.1)


def float32_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy from logits cast to float32, as Hugging Face's ``labels=``."""
    logits = model(input_ids=batch["input_ids"]).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )


def lora_gpt2(
    dtype: torch.dtype, loss_fn, probe: dict, adapter_dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    """A GPT-2 in ``dtype`` with peft's LoRA on its attention (dropout on, train mode) after
    five AdamW steps at the Trainer's default learning rate; its trainable parameters and the
    update it would make next on ``probe``. The adapters are in ``dtype`` too, or, given
    ``adapter_dtype=torch.float32`` on a bf16 base, float32 as peft makes them by default."""
    import peft

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True)
    if adapter_dtype in (None, dtype):
        model = peft.get_peft_model(float64_gpt2(dropout=0.1, n_layer=2), config).to(dtype)
    else:
        model = peft.get_peft_model(float64_gpt2(dropout=0.1, n_layer=2).to(dtype), config)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {adapter_dtype}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-5)
    for seed in range(10, 15):
        loss_fn(model, token_batch(batch_size=8, seed=seed)).backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_fn(model, probe).backward()
    direction = sm.update_direction(optimizer).over(trainable)
    optimizer.zero_grad()
    return model, trainable, direction


def test_rounding_never_fakes_a_crossing_on_a_lora_model():
    """LoRA trains few parameters with small gradients: d'g is small, so steps far below eta_c
    change the float32 loss by less than its rounding. Before, a check below a warm start
    then saw a rounding rise of 1-2 ulps and returned it as ok (lambda_c ~ 7e5 against ~1,
    at 22 of 60 warm starts). Every ok bracket's top must rise in float64 arithmetic at the
    same parameters."""
    batch = token_batch(batch_size=8, seed=3)
    model64, trainable64, direction = lora_gpt2(torch.float64, causal_lm_loss, batch)
    model32 = copy.deepcopy(model64).float()
    trainable32 = [p for p in model32.parameters() if p.requires_grad]
    exact = ProbeLoss(model64, causal_lm_loss, batch)
    base = float(exact())
    steps = [p.detach().clone() for p in trainable64]
    tops = []
    for k in range(0, 60, 2):
        result = sm.critical_sharpness(
            model32,
            causal_lm_loss,
            batch,
            direction.float(),
            params=trainable32,
            eta0=3.0 * 10 ** (-k / 6),
        )
        assert result.status in ("ok", "not_converged"), result
        if result.status == "ok":
            tops.append(result.hi)
    assert len(tops) >= 25
    with torch.no_grad():
        for hi in tops:
            offset = 0
            for p, theta0 in zip(trainable64, steps):
                n = p.numel()
                p.copy_(theta0 - hi * direction[offset : offset + n].view_as(p))
                offset += n
            assert float(exact()) > base, hi
        for p, theta0 in zip(trainable64, steps):
            p.copy_(theta0)


def bf16_autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def autocast_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """float32_loss with the network in bf16 autocast, as accelerate wraps ``forward``."""
    with bf16_autocast():
        return float32_loss(model, batch)


# How the network computes in bf16: (the model's dtype, its adapters', the loss, an autocast
# region around the measurement).
BF16_COMPUTE = {
    "bf16 weights": (torch.bfloat16, torch.bfloat16, float32_loss, False),
    "bf16 base, float32 adapters": (torch.bfloat16, torch.float32, float32_loss, False),
    "autocast in the forward": (torch.float32, torch.float32, autocast_loss, False),
    "measured inside autocast": (torch.float32, torch.float32, float32_loss, True),
}


@pytest.mark.parametrize("case", BF16_COMPUTE)
def test_a_network_computing_in_bf16_fakes_no_crossing(case):
    """A LoRA model whose network computes in bf16, with a float32 loss on a probe of two
    sequences (16 tokens): the rounding of its activations moves the loss by more than
    float32's rounding at steps the parameters store faithfully. Before, 13 to 15 of 20 warm
    starts gave lambda_c of 7e3 to 4e5 (bf16 weights, float32 adapters); keyed on the measured
    parameters' dtype, float32 adapters on a bf16 base still did, and autocast gave 8 of 20
    nondescent. Measured inside an autocast region, the loss never moved (torch's cache of
    the bf16 weights): 20 of 20 no_increase. Float32's is 2.7."""
    model_dtype, adapter_dtype, loss_fn, inside = BF16_COMPUTE[case]
    probe = token_batch(batch_size=2, seed=3)
    reference, trainable, direction = lora_gpt2(torch.float32, float32_loss, probe)
    full = sorted(measure_from_warm_starts(reference, float32_loss, probe, direction, trainable))
    model, trainable, direction = lora_gpt2(model_dtype, loss_fn, probe, adapter_dtype)
    with bf16_autocast() if inside else contextlib.nullcontext():
        values = measure_from_warm_starts(model, loss_fn, probe, direction, trainable)
    median = full[len(full) // 2]
    assert all(v == pytest.approx(median, rel=0.15) for v in values), values


def measure_from_warm_starts(model, loss_fn, probe, direction, trainable) -> list[float]:
    """Critical sharpness from 20 warm starts over 10 decades below 1 (from 3, a check below
    misses the first crossing at 0.74 and brackets one at 2.9, rounding or not); every status
    must be ok."""
    results = [
        sm.critical_sharpness(
            model, loss_fn, probe, direction, params=trainable, eta0=10 ** (-k / 6)
        )
        for k in range(0, 60, 3)
    ]
    assert all(r.status == "ok" for r in results), [r.status for r in results]
    return [r.value for r in results]


@pytest.mark.parametrize("given", [False, True])
def test_a_bf16_loss_rounding_in_steps_of_its_ulp_fakes_no_crossing(given):
    """conftest's loss of a bf16 model is a bf16 number: it moves in ulps of 0.016 at 2.7.
    Before, warm starts of 2e-8 to 5e-4 met a rise of 2 ulps at 8e-4 and returned lambda_c ~
    2.6e3 (the float32 model's is 7.9, the bf16 one's ~7). With the loss and gradient given, as
    the meter calls it, the loss's dtype shows only at the first step, which a too small warm
    start then had wrong (nondescent)."""
    base = float64_gpt2(n_layer=2)
    batch = token_batch(batch_size=8, seed=3)
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        causal_lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = causal_lm_loss(model, batch)
        loss.backward()
        direction = sm.update_direction(optimizer)
        known = {"loss": float(loss), "gradient": [p.grad for p in model.parameters()]}
        results = [
            sm.critical_sharpness(
                model,
                causal_lm_loss,
                batch,
                direction,
                eta0=10 ** (-k / 6),
                **(known if given else {}),
            )
            for k in range(0, 60, 3)
        ]
        assert all(r.status == "ok" for r in results)
        values[dtype] = [r.value for r in results]
    full = sorted(values[torch.float32])[len(values[torch.float32]) // 2]
    assert all(v == pytest.approx(full, rel=0.15) for v in values[torch.bfloat16])


def test_parameters_restored_bit_identically_and_rng_untouched():
    model = float64_gpt2(dropout=0.1).train()
    batch = token_batch()
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    result = sm.critical_sharpness(model, causal_lm_loss, batch, op.gradient, eta0=0.1)
    assert result.status == "ok" and math.isfinite(result.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.equal(torch.get_rng_state(), rng)
    # Along the gradient the line search sees second order plus the rest: same ballpark.
    directional = sm.directional_sharpness(op, op.gradient).value
    assert 0.25 < result.value / directional < 4


def test_bad_input(quadratic):
    d = descent_direction(quadratic, 0)
    with pytest.raises(ValueError, match="eta0"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, d, eta0=0.0)
    with pytest.raises(ValueError, match="length"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        sm.critical_sharpness(quadratic, quadratic_loss, None, d * float("inf"))
    for bits in (0, 53):
        with pytest.raises(ValueError, match="precision_bits"):
            sm.critical_sharpness(quadratic, quadratic_loss, None, d, precision_bits=bits)
        with pytest.raises(ValueError, match="critical_precision_bits"):
            sm.MeterOptions(critical_precision_bits=bits)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="check_below"):
            sm.critical_sharpness(quadratic, quadratic_loss, None, d, check_below=bad)
        with pytest.raises(ValueError, match="predictions"):
            sm.critical_sharpness(quadratic, quadratic_loss, None, d, predictions=bad)
        with pytest.raises(ValueError, match="critical_predictions"):
            sm.MeterOptions(critical_predictions=bad)
    with pytest.raises(ValueError, match="gradient="):
        sm.directional_sharpness(torch.eye(12, dtype=torch.float64), d)


def test_known_loss_and_gradient_save_the_base_forward(quadratic):
    d = descent_direction(quadratic, 1)
    eta_c = 2 / exact_critical(quadratic, d)
    with torch.no_grad():
        loss = float(quadratic_loss(quadratic, None))
    result = sm.critical_sharpness(
        quadratic,
        quadratic_loss,
        None,
        d,
        eta0=1.1 * eta_c,
        precision_bits=K,
        gradient=quadratic.gradient(),
        loss=loss,
    )
    assert result.num_forward == 1 + 2 + CHECK_BELOW  # the warm start, the straddle, the checks
    assert result.value == pytest.approx(exact_critical(quadratic, d), rel=TOLERANCE)


def test_a_parameter_vector_direction_is_read_by_parameter():
    """update_direction's ParameterVector holds the optimizer's group order (no-decay first
    here), not the model's: it is read parameter by parameter, and one over other parameters
    than the measured ones is refused, never mixed up."""
    model = float64_gpt2().eval()
    batch = token_batch(3)
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=1e-3
    )
    model(**batch).loss.backward()
    d = sm.update_direction(optimizer)
    every = list(model.parameters())
    by_vector = sm.critical_sharpness(model, causal_lm_loss, batch, d, eta0=1e-3)
    by_tensor = sm.critical_sharpness(model, causal_lm_loss, batch, d.over(every), eta0=1e-3)
    assert by_vector.status == "ok" and by_vector == by_tensor
    with pytest.raises(ValueError, match="other parameters"):
        sm.critical_sharpness(model, causal_lm_loss, batch, d, params=decay)
    restricted = sm.critical_sharpness(model, causal_lm_loss, batch, d.over(decay), params=decay)
    assert restricted.num_forward > 0


class Shaped(Line):
    """A loss with one crossing and no quadratic in sight: ``-eta + c eta^k`` (crossing at
    ``c^(1 / (1 - k))``) or ``-eta + c (exp(eta) - 1 - eta)``."""

    def __init__(self, c: float, k: float | None) -> None:
        super().__init__()
        self.c, self.k = c, k

    def along(self, eta):
        if self.k is None:
            return -eta + self.c * (torch.expm1(eta) - eta)
        return -eta + self.c * eta.abs() ** self.k

    def crossing(self) -> float:
        if self.k is not None:
            return self.c ** (1 / (1 - self.k))
        lo, hi = 1e-9, 100.0  # r rises through 0 once: bisect it to float precision
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if -mid + self.c * (math.expm1(mid) - mid) <= 0 else (lo, mid)
        return hi


@pytest.mark.parametrize("shape", [(0.3, 3), (2.0, 1.5), (5.0, 6), (0.5, None), (40.0, None)])
@pytest.mark.parametrize("warm", [0.3, 0.95, 1.7, 1e-4])
def test_predictions_choose_the_steps_never_the_answer(shape, warm):
    """Far from quadratic the predictions miss, and the bracket is still one of seen losses
    around the one crossing, to the precision asked, as the plain search's is."""
    model = Shaped(*shape)
    eta_c = model.crossing()
    results = [
        sm.critical_sharpness(
            model, quadratic_loss, None, ALONG, eta0=warm * eta_c, precision_bits=K, predictions=n
        )
        for n in (PREDICTIONS, 0)
    ]
    for result in results:
        assert result.status == "ok", result
        assert result.lo < eta_c <= result.hi and 1 - result.lo / result.hi <= TOLERANCE


class BumpOnTheWay(Line):
    """-eta + 0.15 eta^2 (crossing at 6.67) with a bump above the start on [1.9, 2.1]: the
    first crossing is 1.9, which a jump from 1 straight to the quadratic's crossing steps over."""

    def along(self, eta):
        return -eta + 0.15 * eta**2 + 10 * ((eta >= 1.9) & (eta <= 2.1))


def test_a_prediction_steps_no_farther_than_doubling_would():
    for predictions in (PREDICTIONS, 0):
        result = sm.critical_sharpness(
            BumpOnTheWay(), quadratic_loss, None, ALONG, eta0=1.0, predictions=predictions
        )
        assert result.status == "ok" and result.lo < 1.9 <= result.hi, (predictions, result)


@pytest.mark.parametrize(
    "ends", [(1e-170, -1e-300, 2e-170, 1e-300), (1e160, -1.0, 3e160, 1.0), (1.0, -1.0, 2.0, 1.0)]
)
def test_a_model_crossing_at_the_ends_of_the_float_range_is_none_or_inside(ends):
    """Squares that underflow or overflow give no prediction (the search bisects), not an error."""
    lo, _, hi, _ = ends
    root = _crossing(*ends, slope=1.0)
    assert root is None or lo < root < hi


class TwoTowers(torch.nn.Module):
    """Text batches go through float32 only, image batches through a bf16 tower too."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = torch.nn.Linear(4, 4).to(torch.bfloat16)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        h = x if image is None else x + self.tower(image).float()
        return self.head(h).pow(2).mean()


class AutocastInside(torch.nn.Module):
    """float32 weights, bf16 arithmetic: autocast inside ``forward``, as accelerate wraps it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.layer(x).float().pow(2).mean()


def test_the_probe_sees_how_coarsely_the_network_computes():
    """What the line search's resolution rests on: bf16 arithmetic anywhere in the first
    forward (every batch of a multi-batch probe, not the first only), also in a model
    compiled before the probe's hooks exist; an integer loss has no rounding to add."""
    bf16, f32 = torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float32).eps
    text, image = (torch.randn(8, 4),), (torch.randn(8, 4), torch.randn(8, 4, dtype=torch.bfloat16))
    for batches in ([text, image], [image, text]):
        probe = ProbeLoss(TwoTowers(), lambda m, b: m(*b), batches, weights=[1, 1])
        probe()
        assert (probe.compute_eps, probe.loss_eps) == (bf16, f32)
    model = torch.compile(AutocastInside(), backend="eager")
    x = torch.randn(8, 4)
    model(x).backward()  # compiled, with and without grad, before any hook
    with torch.no_grad():
        model(x)
    probe = ProbeLoss(model, lambda m, b: m(b), x)
    with torch.no_grad():
        probe()
    assert probe.compute_eps == bf16
    counts = ProbeLoss(TwoTowers(), lambda m, b: (m(*b) > 0).sum(), text)
    assert float(counts()) == 1 and counts.loss_eps == 0


def test_directional_sharpness_refuses_a_non_finite_direction():
    """critical_sharpness refused it; directional_sharpness answered nondescent."""
    hessian = torch.eye(3, dtype=torch.float64)
    gradient = torch.ones(3, dtype=torch.float64)
    direction = torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="finite"):
        sm.directional_sharpness(hessian, direction, gradient)

"""Batched Hessian-vector products (``products_per_call > 1``): several columns in one backward
through the gradient's graph, against the dense Hessian and against single products, in the
operator, the trace estimators, the shared Krylov run and the meter; the fallback to single
products where a batched backward fails."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import causal_lm_loss, float64_gpt2, relative_error, token_batch

import sharpmeter as sm
from sharpmeter.harness.config import SharpnessArguments
from sharpmeter.measure.estimators.krylov import trace_and_top
from sharpmeter.measure.operators import HessianOperator

EXACT = 1e-10
ROUNDING = 1e-12


def test_batched_products_match_the_dense_hessian(hessian_case):
    """Blocks of 3 over 5 columns (one batched call of 3, one of 2): each column is H v, and
    the single-product operator's column to rounding; the count is one per column."""
    model, hessian = hessian_case.model, hessian_case.hessian
    batched = HessianOperator(model, hessian_case.loss_fn, hessian_case.batch, products_per_call=3)
    single = HessianOperator(model, hessian_case.loss_fn, hessian_case.batch)
    block = torch.randn(batched.dim, 5, generator=torch.Generator().manual_seed(0)).double()
    product = batched @ block
    assert product.shape == block.shape and batched.num_matvecs == 5
    assert (batched @ block[:, :3]).is_contiguous()  # NCCL all-reduces only contiguous tensors
    for column, expected, alone in zip(product.T, (hessian @ block).T, (single @ block).T):
        assert relative_error(column, expected) < EXACT
        assert relative_error(column, alone) < ROUNDING


def test_a_batched_call_is_one_backward(gpt2_reference, monkeypatch):
    model, batch, _ = gpt2_reference
    op = HessianOperator(model, causal_lm_loss, batch, products_per_call=4)
    calls = []
    real_grad = torch.autograd.grad

    def recording(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    op @ torch.ones(op.dim, 10, dtype=torch.float64)
    assert calls == [True, True, True]  # 4 + 4 + 2 columns


@pytest.mark.parametrize("estimator", [sm.hutchinson, sm.hutchpp])
def test_trace_estimators_draw_the_same_probes_in_blocks(gpt2_reference, estimator):
    """On the batched operator, the dense matrix and the single-product operator: the same
    samples to rounding, the same products spent."""
    model, batch, hessian = gpt2_reference
    op = HessianOperator(model, causal_lm_loss, batch, products_per_call=4)
    single = HessianOperator(model, causal_lm_loss, batch)
    batched, alone, dense = (estimator(a, 22, seed=3) for a in (op, single, hessian))
    assert batched.num_matvecs == alone.num_matvecs == op.num_matvecs == 22
    scale = float(batched.samples.abs().max())
    torch.testing.assert_close(batched.samples, alone.samples, rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(batched.samples, dense.samples, rtol=1e-9, atol=1e-10 * scale)
    assert abs(batched.value - float(hessian.trace())) <= 4 * batched.stderr


def test_the_shared_krylov_run_deflates_batched_probes_alike(gpt2_reference):
    """The pilot of a target standard error is kept and deflated as the basis grows: its
    columns, multiplied in blocks, give the samples the single products give."""
    model, batch, _ = gpt2_reference
    results = [
        trace_and_top(
            HessianOperator(model, causal_lm_loss, batch, products_per_call=per_call),
            num_matvecs=6,
            rel_stderr=0.2,
            seed=1,
        )
        for per_call in (1, 4)
    ]
    single, batched = results
    assert batched.rank == single.rank and batched.num_matvecs == single.num_matvecs
    assert batched.top.value == pytest.approx(single.top.value, rel=1e-12)
    torch.testing.assert_close(batched.trace.samples, single.trace.samples, rtol=1e-9, atol=1e-9)


class _Awkward(torch.nn.Module):
    """A bfloat16 parameter, a frozen one, one the loss never uses, one it is linear in."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.low = torch.nn.Parameter(torch.randn(3, 4, generator=generator).bfloat16())
        self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
        self.unused = torch.nn.Parameter(torch.randn(2))
        self.linear = torch.nn.Parameter(torch.randn(3, generator=generator))
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=generator))

    def forward(self, x):
        hidden = torch.tanh(x @ self.w.T + self.frozen) @ self.low.float().T
        return hidden.pow(2).sum() + (self.linear * x).sum()


def test_awkward_parameters_and_a_parameter_write_give_the_single_products():
    """Batched equals single products to float32 rounding (exact zeros for the unused parameter
    and the one the gradient does not depend on, bfloat16 tangents cast alike), also after the
    parameters were written in place, when both rebuild the gradient's graph."""
    model, x = _Awkward(), torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    operators = [
        HessianOperator(model, lambda m, batch: m(batch), x, products_per_call=k) for k in (1, 4)
    ]
    block = torch.randn(operators[0].dim, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        single, batched = (op @ block for op in operators)
        scale = float(single.abs().max())
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6 * scale)
        # Rows of `unused` and `linear` (after the 12 of `low`; `frozen` is not measured).
        assert not batched[12:17].any() and batched[:12].any() and batched[17:].any()
        with torch.no_grad():
            model.w.mul_(1.5)
    assert [op.num_matvecs for op in operators] == [12, 12]


class _SquareNeedingAValue(torch.autograd.Function):
    """x**2 whose backward branches on a value: vmap cannot batch it (aten::is_nonzero)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad if bool(grad.abs().sum() > 0) else torch.zeros_like(x)


class _Quartic(torch.nn.Module):
    """L = sum_i b_i w_i^4, Hessian diag(12 b w^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))

    def forward(self, b):
        return (_SquareNeedingAValue.apply(self.w) ** 2 * b).sum()


def quartic_operator(products_per_call: int) -> tuple[HessianOperator, torch.Tensor]:
    model, b = _Quartic(), torch.arange(1.0, 6.0, dtype=torch.float64)
    op = HessianOperator(model, lambda m, batch: m(batch), b, products_per_call=products_per_call)
    return op, torch.diag(12 * b * model.w.detach() ** 2)


def test_a_failing_batched_call_warns_once_and_goes_on_one_vector_at_a_time():
    op, hessian = quartic_operator(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        product = op @ torch.eye(5, dtype=torch.float64)
        again = sm.hutchinson(op, 6, seed=0)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 1 and "is_nonzero" in messages[0], messages
    assert op.products_per_call == 1
    torch.testing.assert_close(product, hessian, rtol=1e-12, atol=0)
    assert op.num_matvecs == 5 + 6  # the failed call counts nothing
    assert again.value == pytest.approx(sm.hutchinson(hessian, 6, seed=0).value, rel=1e-12)


def test_out_of_memory_in_a_batched_call_falls_back_too(gpt2_reference, monkeypatch):
    """What a GPU raises when k products' backward does not fit (torch.OutOfMemoryError)."""
    model, batch, hessian = gpt2_reference
    op = HessianOperator(model, causal_lm_loss, batch, products_per_call=4)
    real_grad = torch.autograd.grad

    def short_of_memory(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", short_of_memory)
    block = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(0)).double()
    with pytest.warns(RuntimeWarning, match="out of memory"):
        product = op @ block
    assert op.products_per_call == 1 and op.num_matvecs == 4
    assert relative_error(product, hessian @ block) < EXACT


def test_the_meter_keeps_to_single_products_after_a_batched_call_failed():
    """Each row builds its operator anew: the second row must not try (and fail) again."""
    model, b = _Quartic(), torch.arange(1.0, 6.0, dtype=torch.float64)
    meter = sm.SharpnessMeter(
        model, b, loss_fn=lambda m, batch: m(batch), measures=("trace",), hvp_products_per_call=3
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = [meter.measure(step) for step in (1, 2)]
    assert len([w for w in caught if w.category is RuntimeWarning]) == 1
    assert meter.hvp_products_per_call == 1
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert rows[0]["hessian_trace"] == rows[1]["hessian_trace"]


def test_under_data_parallelism_a_failing_batched_call_raises(monkeypatch):
    """Ranks falling back apart would disagree on the all-reduces to come: raise instead."""
    op, _ = quartic_operator(3)
    monkeypatch.setattr(op.probe, "distributed", True)
    with pytest.raises(RuntimeError, match="is_nonzero"):
        op @ torch.eye(5, dtype=torch.float64)


def test_bad_arguments():
    model, batch = float64_gpt2(), token_batch()
    with pytest.raises(ValueError, match="products_per_call"):
        HessianOperator(model, causal_lm_loss, batch, products_per_call=0)
    with pytest.raises(ValueError, match="mode 'fd' takes 1"):
        HessianOperator(model, causal_lm_loss, batch, mode="fd", products_per_call=2)
    with pytest.raises(ValueError, match="hvp_products_per_call"):
        sm.MeterOptions(hvp_products_per_call=0)
    with pytest.raises(ValueError, match="hvp_mode 'fwd' takes 1"):
        sm.MeterOptions(hvp_mode="fwd", hvp_products_per_call=4)
    with pytest.raises(ValueError, match="hvp_products_per_call"):
        SharpnessArguments(hvp_products_per_call=-1)
    assert SharpnessArguments(hvp_products_per_call=4).meter_options().hvp_products_per_call == 4


def test_the_meter_with_batched_products_gives_the_same_row_and_leaves_training_alone(
    monkeypatch,
):
    """Dropout on (fixed-seed masks), trace beside spectral and alone: the batched meter's row
    equals the single-product meter's to rounding, its probes went in blocks of 4, and the
    parameters, their gradients, the global RNG and the train mode are as they were."""
    model = float64_gpt2(dropout=0.1).train()
    batch = token_batch(3)
    causal_lm_loss(model, batch).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    rng = torch.get_rng_state()
    widths = []
    real_matmat = HessianOperator._matmat

    def recording(operator, block):
        widths.append(block.shape[1])
        return real_matmat(operator, block)

    monkeypatch.setattr(HessianOperator, "_matmat", recording)
    options = {"dropout": "train", "trace_num_matvecs": 8}
    for measures in (("critical", "trace", "spectral"), ("trace",)):
        single = sm.SharpnessMeter(model, batch, measures=measures, **options).measure(1)
        widths.clear()
        batched = sm.SharpnessMeter(
            model, batch, measures=measures, hvp_products_per_call=4, **options
        ).measure(1)
        assert widths == [4, 4], measures
        assert batched["status"] == single["status"] == "ok"
        for column in ("hessian_trace", "hessian_trace_stderr", "lambda_max"):
            if column in single:
                assert batched[column] == pytest.approx(single[column], rel=1e-9), column
        assert batched["hessian_trace_num_matvecs"] == 8
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for p, (value, grad) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, value) and torch.equal(p.grad, grad)

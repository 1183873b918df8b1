"""The preconditioned Hessian P^-1/2 H P^-1/2 with Adam's P, against dense references."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_lm_loss, tiny_gpt2, token_batch

import sharpmeter as sm


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_is_what_adam_divides_by(amsgrad):
    """With beta1 = 0 an Adam step is exactly -lr * g / P, P computed from the state after it."""
    model = tiny_gpt2().eval()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.99), eps=1e-6, amsgrad=amsgrad)
    for seed in range(3):
        optimizer.zero_grad()
        causal_lm_loss(model, token_batch(seed=seed)).backward()
        before = torch.cat([p.detach().reshape(-1).clone() for p in params])
        optimizer.step()
    gradient = torch.cat([p.grad.reshape(-1) for p in params])
    step = torch.cat([p.detach().reshape(-1) for p in params]) - before
    preconditioner = sm.adam_preconditioner(optimizer, params)
    assert torch.allclose(step, -1e-3 * gradient / preconditioner, rtol=1e-9, atol=1e-15)


def test_preconditioned_top_eigenvalue_matches_dense(gpt2_reference):
    model, batch, hessian = gpt2_reference
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.rand(hessian.shape[0], generator=generator, dtype=torch.float64) * 3 + 0.01
    scale = diagonal.rsqrt()
    dense = scale[:, None] * hessian * scale[None, :]
    exact = torch.linalg.eigvalsh(dense).flip(0)
    op = sm.PreconditionedOperator(sm.HessianOperator(model, causal_lm_loss, batch), diagonal)
    result = sm.lanczos(op, k=2, max_iter=80, tol=1e-10)
    assert torch.allclose(result.values, exact[:2], rtol=1e-8, atol=0)
    # P^-1 H has the same spectrum: the stability threshold an Adam step sees.
    similar = torch.linalg.eigvals(hessian / diagonal[:, None]).real.max()
    assert result.value == pytest.approx(float(similar), rel=1e-7)
    assert result.num_matvecs == op.num_matvecs


def test_bad_preconditioners(gpt2_reference):
    model, batch, _ = gpt2_reference
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    with pytest.raises(ValueError, match="length"):
        sm.PreconditionedOperator(op, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        sm.PreconditionedOperator(op, torch.zeros(op.dim))
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="no Adam state"):
        sm.adam_preconditioner(fresh, list(model.parameters()))
    with pytest.raises(ValueError, match="not optimized"):
        sm.adam_preconditioner(fresh, [torch.nn.Parameter(torch.ones(1))])

"""The preconditioned Hessian P^-1/2 H P^-1/2 with Adam's P, against dense references."""

from __future__ import annotations

import pytest
import torch
from conftest import causal_lm_loss, float64_gpt2, token_batch

import sharpmeter as sm


@pytest.mark.parametrize("warm_steps", [0, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_is_what_the_next_step_divides_by(amsgrad, weight_decay, warm_steps):
    """With beta1 = 0 the next Adam step is exactly -lr * (g + wd theta) / P, P taken before it
    from the state and the gradient of that step (no state at all before the first step)."""
    model = float64_gpt2().eval()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(
        params, lr=1e-3, betas=(0.0, 0.99), eps=1e-6, amsgrad=amsgrad, weight_decay=weight_decay
    )
    for seed in range(warm_steps + 1):
        optimizer.zero_grad()
        causal_lm_loss(model, token_batch(seed=seed)).backward()
        if seed < warm_steps:
            optimizer.step()
    preconditioner = sm.adam_preconditioner(optimizer, params)
    assert [id(p) for p in preconditioner.params] == [id(p) for p in params]
    theta = torch.cat([p.detach().reshape(-1).clone() for p in params])
    gradient = torch.cat([p.grad.reshape(-1) for p in params]) + weight_decay * theta
    optimizer.step()
    step = torch.cat([p.detach().reshape(-1) for p in params]) - theta
    expected = -1e-3 * gradient / preconditioner.vector
    assert torch.allclose(step, expected, rtol=1e-9, atol=1e-15)


def test_preconditioner_follows_the_clipped_probe_gradient():
    """Given gradients and clipping enter P as they enter the measured step."""
    model = float64_gpt2().eval()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    causal_lm_loss(model, token_batch(seed=0)).backward()
    optimizer.step()
    probe = [torch.randn_like(p) for p in params]
    norm = torch.cat([g.reshape(-1) for g in probe]).norm()
    clipped = sm.adam_preconditioner(optimizer, params, gradients=probe, max_grad_norm=0.5)
    scaled = [g * (0.5 / (norm + 1e-6)) for g in probe]
    expected = sm.adam_preconditioner(optimizer, params, gradients=scaled)
    torch.testing.assert_close(clipped.vector, expected.vector, rtol=1e-12, atol=0)
    unclipped = sm.adam_preconditioner(optimizer, params, gradients=probe)
    assert not torch.allclose(unclipped.vector, clipped.vector)


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
    causal_lm_loss(model, batch).backward()
    try:
        with pytest.raises(ValueError, match="Adam-type"):
            sm.adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1))

        class ScaledAdamW(torch.optim.AdamW):  # steps by another rule than AdamW's
            pass

        with pytest.raises(ValueError, match="a subclass of Adam, which may step differently"):
            sm.adam_preconditioner(ScaledAdamW(model.parameters()))
        with pytest.raises(ValueError, match="none of params"):
            sm.adam_preconditioner(
                torch.optim.Adam(model.parameters()), [torch.nn.Parameter(torch.ones(1))]
            )
    finally:
        model.zero_grad(set_to_none=True)  # the model is a shared fixture


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("optimizer_type", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_preconditioner_is_the_second_moment_of_the_real_step(
    optimizer_type, maximize, weight_decay
):
    """P = sqrt(v / (1 - beta2^(t+1))) + eps with v the exp_avg_sq the real step t + 1 leaves:
    ``maximize`` negates g before Adam's coupled decay adds wd theta to it (AdamW's decay is
    decoupled and never enters v)."""
    model = float64_gpt2().eval()
    params = list(model.parameters())
    betas, eps = (0.9, 0.99), 1e-6
    optimizer = optimizer_type(
        params, lr=0.05, betas=betas, eps=eps, maximize=maximize, weight_decay=weight_decay
    )
    for seed in range(3):
        optimizer.zero_grad()
        causal_lm_loss(model, token_batch(seed=seed)).backward()
        if seed < 2:
            optimizer.step()
    preconditioner = sm.adam_preconditioner(optimizer, params)
    optimizer.step()
    expected = []
    for p in params:
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - betas[1] ** float(state["step"]))
        expected.append((v_hat.sqrt() + eps).reshape(-1))
    torch.testing.assert_close(preconditioner.vector, torch.cat(expected), rtol=1e-10, atol=0)

"""Shared fixtures: a ~1K-parameter float64 GPT-2 with an exact loss, dense references, a
quadratic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sharpmeter.measure.distributed import local
from sharpmeter.measure.loss import causal_lm_loss  # noqa: F401  (the tests import it from here)

VOCAB, SEQ = 16, 8


def float64_gpt2(dropout: float = 0.0, seed: int = 0, n_layer: int = 1) -> nn.Module:
    """A ~1K-parameter GPT-2 in float64 (LayerNorm, attention, tied embeddings), default
    attention: small enough for a dense Hessian. Not the harness's ``tiny`` size
    (:mod:`sharpmeter.harness.gpt`, n_embd 16); the shape of the benchmarks' ``1K``."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=8,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).double()


def token_batch(batch_size: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids}


def dense_hessian(model: nn.Module, loss_fn, batch, params=None) -> torch.Tensor:
    """The exact Hessian, one row per double backward of one gradient entry (no torch.func)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for i in range(flat.numel()):
            row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if r is None else r).reshape(-1)
                        for r, p in zip(row, params)
                    ]
                )
            )
    return torch.stack(rows).detach()


@pytest.fixture(scope="session")
def gpt2_reference():
    """(model in eval mode, batch, dense Hessian) for :func:`float64_gpt2`."""
    model = float64_gpt2().eval()
    batch = token_batch()
    return model, batch, dense_hessian(model, causal_lm_loss, batch)


class Quadratic(nn.Module):
    """L(theta) = 1/2 theta' H theta - b' theta, called with any batch."""

    def __init__(self, hessian: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("hessian", hessian)
        self.register_buffer("b", b)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, _batch) -> torch.Tensor:
        return 0.5 * self.theta @ self.hessian @ self.theta - self.b @ self.theta

    def gradient(self) -> torch.Tensor:
        return (self.hessian @ self.theta - self.b).detach()


def quadratic_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(batch)


def matrix_with_spectrum(values, seed: int = 0) -> torch.Tensor:
    """Q diag(values) Q' with a random orthogonal Q."""
    values = torch.as_tensor(values, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(len(values), len(values), generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q @ torch.diag(values) @ q.T


@pytest.fixture
def quadratic() -> Quadratic:
    generator = torch.Generator().manual_seed(3)
    n = 12
    return Quadratic(
        matrix_with_spectrum(torch.linspace(0.1, 10.0, n)),
        torch.randn(n, generator=generator, dtype=torch.float64),
        torch.randn(n, generator=generator, dtype=torch.float64),
    )


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Everything a measurement must leave as it was: parameters, gradients (contents and
    identity), flags, buffers, modes, the RNG, optimizer state. Sharded (FSDP2) tensors are
    compared by this rank's shard."""
    return {
        "params": [local(p).detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else local(p.grad).clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "optimizer": {
            key: {name: _copy(value) for name, value in state.items()}
            for key, state in optimizer.state_dict()["state"].items()
        },
        "attn": model.config._attn_implementation,
    }


def _copy(value):
    return local(value).clone() if isinstance(value, torch.Tensor) else value


def assert_same(before: dict, after: dict) -> None:
    """Bit for bit: :func:`snapshot` before and after."""
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(before["grads"], after["grads"])
    )
    assert before["grad_ids"] == after["grad_ids"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(torch.equal(a, b) for a, b in zip(before["buffers"], after["buffers"]))
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])
    assert before["attn"] == after["attn"]
    for key, state in before["optimizer"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(after["optimizer"][key][name])
            )


# Holds a lock file's flock with the given text in it, as a run of another container would:
# fast to start (no sharpmeter import), and free to name any owner.
FLOCK_HOLDER = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.write(descriptor, sys.argv[2].encode())
print("held", flush=True)
time.sleep(60)
"""

RUN_HOLDER = """
import sys, time
from sharpmeter.harness.runlock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def hold():
    """Starts a process running ``script`` with ``args`` that holds a lock; its Popen."""
    holders = []

    def start(script: str, *args: str) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
        holders.append(holder)
        assert holder.stdout.readline() == b"held\n"
        return holder

    yield start
    for holder in holders:
        holder.kill()
        holder.wait()
        holder.stdout.close()

"""Shared fixtures: a ~1K-parameter float64 GPT-2 with an exact loss, dense references, a
quadratic, and the cases of :func:`hessian_case` (GPT-2, Llama, MLP, BatchNorm) with theirs."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sharpmeter.measure.distributed import local
from sharpmeter.measure.loss import causal_lm_loss  # noqa: F401  (the tests import it from here)

VOCAB, SEQ = 16, 8


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far ``a`` is from the reference ``b``."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


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


@pytest.fixture(autouse=True)
def unloaded_wandb():
    """wandb reads its WANDB_* variables once per process, when first used: each test starts
    and ends with it unloaded (where a test module imported it), so that the variables a test
    sets count and leave no trace."""
    _teardown_wandb()
    yield
    _teardown_wandb()


def _teardown_wandb() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()


@pytest.fixture(scope="session")
def gpt2_reference():
    """(model in eval mode, batch, dense Hessian) for :func:`float64_gpt2`."""
    model = float64_gpt2().eval()
    batch = token_batch()
    return model, batch, dense_hessian(model, causal_lm_loss, batch)


class ExactRMSNorm(transformers.models.llama.modeling_llama.LlamaRMSNorm):
    """Llama's RMSNorm in the input's dtype: Hugging Face's computes it in float32 even in a
    float64 model, which leaves the loss float32-exact (dense Hessian asymmetric to 1e-7)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


def float64_llama(seed: int = 0) -> nn.Module:
    """A 664-parameter Llama in float64 (RMSNorm, rotary embeddings, grouped-query attention,
    SwiGLU, untied head), nothing downloaded. Default (SDPA) attention, which the operators run
    on the math backend: eager attention takes its softmax in float32, as the RMSNorm does
    (replaced by :class:`ExactRMSNorm`), so only then is the float64 loss exact."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).double()
    for module in model.modules():
        if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
            module.__class__ = ExactRMSNorm
    return model


def squared_error(model: nn.Module, batch) -> torch.Tensor:
    """Mean squared error of ``model(x)`` against ``y``, written out: ``F.mse_loss`` has no
    forward-over-reverse derivative (pytorch issue 123996), so ``mode="fwd"`` fails on it."""
    inputs, targets = batch
    return (model(inputs) - targets).pow(2).mean()


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)


def tanh_mlp(seed: int = 0) -> nn.Module:
    """5 -> 16 -> 16 -> 3 with tanh, 419 parameters in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


def batchnorm_net(seed: int = 0) -> nn.Module:
    """Conv 3x3 -> BatchNorm -> tanh -> linear on 1x6x6 images, 243 parameters in float64, in
    eval mode (as measurements run) with running statistics far from their initial 0 and 1,
    accumulated over a few train-mode forwards of shifted, scaled data."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=None),  # running statistics: the plain average
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).double()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _ in range(3):
            model(1.5 + 3 * torch.randn(16, 1, 6, 6, generator=generator, dtype=torch.float64))
    return model.eval()


@dataclass
class HessianCase:
    """A float64 model in eval mode, its probe batch and loss, and its exact (dense) Hessian
    over all parameters, flattened in ``model.parameters()`` order."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Any
    hessian: torch.Tensor


def case_inputs(name: str) -> tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any]:
    """(model, loss_fn, batch) of one of :data:`CASES`."""
    generator = torch.Generator().manual_seed(2)
    if name == "gpt2":
        return float64_gpt2().eval(), causal_lm_loss, token_batch()
    if name == "llama":
        return float64_llama().eval(), causal_lm_loss, token_batch()
    if name == "mlp":
        inputs = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        targets = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        return tanh_mlp().eval(), squared_error, (inputs, targets)
    if name == "batchnorm":
        images = torch.randn(6, 1, 6, 6, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (6,), generator=generator)
        return batchnorm_net(), classification_loss, (images, labels)
    raise ValueError(f"no case {name!r}")


CASES = ("gpt2", "llama", "mlp", "batchnorm")


@pytest.fixture(scope="session", params=CASES)
def hessian_case(request) -> HessianCase:
    """Each of :data:`CASES` with its dense Hessian (built once per session): the shared
    fixture of the operator-against-dense-reference tests (``tests/test_cases.py``)."""
    if request.param == "gpt2":
        model, batch, hessian = request.getfixturevalue("gpt2_reference")
        return HessianCase("gpt2", model, causal_lm_loss, batch, hessian)
    model, loss_fn, batch = case_inputs(request.param)
    return HessianCase(request.param, model, loss_fn, batch, dense_hessian(model, loss_fn, batch))


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
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
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


@pytest.fixture
def fork_child():
    """Forks a child that lives until the test ends, as a persistent DataLoader worker does,
    once it has started (it has copies of the descriptors open here at the fork)."""
    context = multiprocessing.get_context("fork")
    children = []

    def live_on(started) -> None:
        started.set()
        time.sleep(60)

    def start() -> None:
        started = context.Event()
        child = context.Process(target=live_on, args=(started,), daemon=True)
        child.start()
        children.append(child)
        assert started.wait(30)

    yield start
    for child in children:
        child.kill()
        child.join()

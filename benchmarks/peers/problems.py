"""The problems every tool gets: a model, a batch and the loss, in the shapes each tool wants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks._common import GPT2_SIZES, GPT2Size, gpt2, token_batch

# 5,520 parameters, float64 (a dense Hessian is the reference); named by its count like the
# others. Results before the rename call it "gpt2-tiny".
GPT2_5K = GPT2Size("5K", vocab_size=128, n_embd=12, n_layer=2, n_head=2, n_positions=16)
ACCURACY_PROBLEMS = ("gpt2-5K", "mlp-tiny")
SPEED_PROBLEMS = ("gpt2-1M", "gpt2-10M", "mlp-1M")


@dataclass
class Problem:
    """A model, a batch and the loss, in the shapes every tool wants.

    ``loss_fn(model, batch)`` (sharpmeter, hessian-eigenthings) and
    ``criterion(logits(inputs), targets)`` (PyHessian, curvlinops) are the same mean loss.
    """

    name: str
    model: nn.Module
    batch: Any
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    logits: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


class LogitsAdapter(nn.Module):
    """GPT-2 as ``input_ids -> (batch * (seq - 1), vocab)`` next-token logits, for a criterion."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def gpt2_problem(model: nn.Module, batch: dict[str, torch.Tensor], name: str) -> Problem:
    from sharpmeter.measure.loss import causal_lm_loss

    return Problem(
        name=name,
        model=model,
        batch=batch,
        loss_fn=causal_lm_loss,
        logits=LogitsAdapter(model),
        inputs=batch["input_ids"],
        targets=batch["labels"][:, 1:].reshape(-1),
    )


def classifier_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def classifier_problem(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, name: str):
    return Problem(name, model, (inputs, targets), classifier_loss, model, inputs, targets)


def mlp(widths: list[int], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A tanh MLP, the peers' home ground (no attention, no LayerNorm)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype).eval()


def make_problem(name: str, batch_size: int = 8, seq_len: int = 128):
    """The model, batch and loss of one named problem."""
    if name == "gpt2-5K":
        model = gpt2(GPT2_5K, torch.float64)
        return gpt2_problem(model, token_batch(GPT2_5K.vocab_size, 4, 16), name)
    if name.startswith("gpt2-"):
        model = gpt2(GPT2_SIZES[name.removeprefix("gpt2-")])
        return gpt2_problem(model, token_batch(model.config.vocab_size, batch_size, seq_len), name)
    widths, samples, dtype = (
        ([64, 64, 32, 10], 256, torch.float64)
        if name == "mlp-tiny"
        else ([784, 1024, 256, 10], 512, torch.float32)
    )
    model = mlp(widths, dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(samples, widths[0], generator=generator, dtype=dtype)
    targets = torch.randint(0, widths[-1], (samples,), generator=generator)
    return classifier_problem(model, inputs, targets, name)

"""HessianOperator against the dense Hessian of a real (~1K-parameter) GPT-2, in every mode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    SEQ,
    VOCAB,
    causal_lm_loss,
    dense_hessian,
    float64_gpt2,
    relative_error,
    token_batch,
)

import sharpmeter as sm
from sharpmeter.measure.context import attention_guard
from sharpmeter.measure.loss import loss_token_count

EXACT = 1e-8
FD = 1e-6


@pytest.mark.parametrize(
    ("mode", "tolerance"), [("double_backward", EXACT), ("fwd", EXACT), ("fd", FD)]
)
def test_hvp_matches_dense_hessian(gpt2_reference, mode, tolerance):
    model, batch, hessian = gpt2_reference
    op = sm.HessianOperator(model, causal_lm_loss, batch, mode=mode)
    assert op.dim == hessian.shape[0] and op.shape == hessian.shape
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, generator=generator, dtype=torch.float64)
        assert relative_error(op @ v, hessian @ v) < tolerance
    assert op.num_matvecs == 3


def test_hvp_equals_central_differences_of_the_gradient(gpt2_reference):
    """Independent of any dense matrix: (g(theta + h v) - g(theta - h v)) / 2h by hand."""
    model, batch, _ = gpt2_reference
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]

    def gradient_at(shift: float) -> torch.Tensor:
        offset = 0
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t + shift * v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        with attention_guard(model):
            grads = torch.autograd.grad(causal_lm_loss(model, batch), params)
        return torch.cat([g.reshape(-1) for g in grads])

    h = 1e-6
    try:
        fd = (gradient_at(h) - gradient_at(-h)) / (2 * h)
    finally:
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
    assert relative_error(op @ v, fd) < 1e-7


def test_matrix_of_columns(gpt2_reference):
    model, batch, hessian = gpt2_reference
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    block = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert relative_error(op @ block, hessian @ block) < EXACT
    assert op.num_matvecs == 3


def test_hf_default_loss_and_default_attention_work(gpt2_reference):
    """model(**batch).loss with default (fused SDPA) attention in eval mode, where the fused CPU
    kernel has no double backward: the operator must switch to the math backend itself, and
    its float32 product is the exact Hessian's (float64, the same weights) to float32 rounding."""
    reference_model, batch, hessian = gpt2_reference
    model = float64_gpt2().float().eval()  # float32 weights: float64_gpt2's, exactly
    assert model.config._attn_implementation == "sdpa"
    op = sm.HessianOperator(model, None, token_batch())
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    hv = op @ v
    assert hv.dtype == torch.float32 and op.loss.dtype == torch.float32
    assert relative_error(hv.double(), hessian @ v.double()) <= 1e-5  # measured 2e-7
    exact_loss = causal_lm_loss(reference_model, batch).item()
    assert float(op.loss) == pytest.approx(exact_loss, rel=1e-6)
    # The same product through eager attention, which has a double backward of its own.
    eager = float64_gpt2().float().eval()
    eager.config._attn_implementation = "eager"
    reference = sm.HessianOperator(eager, None, token_batch())
    torch.testing.assert_close(op.loss, reference.loss)
    torch.testing.assert_close(hv, reference @ v, rtol=1e-4, atol=1e-6)


def test_parameter_subset_is_the_dense_block(gpt2_reference):
    model, batch, hessian = gpt2_reference
    params = list(model.parameters())
    layer = list(model.transformer.h[0].ln_1.parameters()) + list(
        model.transformer.h[0].attn.parameters()
    )
    index = torch.cat(
        [
            torch.arange(start, start + p.numel())
            for start, p in zip(
                torch.cumsum(torch.tensor([0] + [q.numel() for q in params[:-1]]), 0).tolist(),
                params,
            )
            if any(p is q for q in layer)
        ]
    )
    op = sm.HessianOperator(model, causal_lm_loss, batch, params=layer)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    block = hessian[index][:, index]
    assert relative_error(op @ v, block @ v) < EXACT
    assert relative_error(op @ v, dense_hessian(model, causal_lm_loss, batch, layer) @ v) < EXACT


def test_multi_batch_probe_is_the_token_weighted_mean(gpt2_reference):
    model, _, _ = gpt2_reference
    first, second = token_batch(2, seed=7), token_batch(4, seed=8)
    second["labels"] = second["labels"].clone()
    second["labels"][:, -3:] = -100  # ragged loss-token counts: weights must follow them

    def summed_loss(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )

    total = loss_token_count(first) + loss_token_count(second)
    assert loss_token_count(second) == 4 * (7 - 3)

    def concatenated_loss(model, _):
        return (summed_loss(model, first) + summed_loss(model, second)) / total

    reference = dense_hessian(model, concatenated_loss, None)
    op = sm.HessianOperator(model, causal_lm_loss, [first, second])
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert relative_error(op @ v, reference @ v) < EXACT
    with torch.no_grad():
        expected = float(concatenated_loss(model, None))
    assert float(op.loss) == pytest.approx(expected, rel=1e-12)
    recomputed = sm.HessianOperator(model, causal_lm_loss, [first, second], reuse_graph=False)
    assert relative_error(recomputed @ v, reference @ v) < EXACT


def test_modes_agree_with_dropout_on():
    """In train mode every forward gets the same dropout masks, so the modes agree."""
    model = float64_gpt2(dropout=0.2).train()
    batch = token_batch()
    v = torch.randn(
        sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(4),
        dtype=torch.float64,
    )
    reference = sm.HessianOperator(model, causal_lm_loss, batch) @ v
    assert (
        relative_error(sm.HessianOperator(model, causal_lm_loss, batch, mode="fwd") @ v, reference)
        < EXACT
    )
    assert (
        relative_error(sm.HessianOperator(model, causal_lm_loss, batch, mode="fd") @ v, reference)
        < FD
    )
    other_masks = sm.HessianOperator(model, causal_lm_loss, batch, seed=1) @ v
    assert relative_error(other_masks, reference) > 1e-3


def test_fd_restores_parameters_bit_identically(gpt2_reference):
    model, batch, _ = gpt2_reference
    before = [p.detach().clone() for p in model.parameters()]
    op = sm.HessianOperator(model, causal_lm_loss, batch, mode="fd")
    op @ torch.randn(op.dim, dtype=torch.float64)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_loss_linear_in_some_parameters_has_zero_hessian_rows():
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    op = sm.HessianOperator(model, lambda m, b: m(b).sum(), x)
    assert torch.equal(
        op @ torch.ones(op.dim, dtype=torch.float64), torch.zeros(op.dim, dtype=torch.float64)
    )


def test_flash_attention_config_is_switched_for_the_measurement_and_back():
    model = float64_gpt2()
    model.config._attn_implementation = "flash_attention_2"
    with attention_guard(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "flash_attention_2"


def test_bad_input_raises_clear_errors(gpt2_reference):
    model, batch, _ = gpt2_reference
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    with pytest.raises(ValueError, match="length"):
        op @ torch.ones(op.dim + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        sm.HessianOperator(model, causal_lm_loss, batch, params=[])
    with pytest.raises(ValueError, match="not a parameter"):
        sm.HessianOperator(model, causal_lm_loss, batch, params=[torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="mode"):
        sm.HessianOperator(model, causal_lm_loss, batch, mode="jacrev")
    with pytest.raises(ValueError, match=r"\.loss"):
        sm.HessianOperator(model, None, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="weights"):
        sm.HessianOperator(model, causal_lm_loss, [batch, batch], weights=[1.0])
    with pytest.raises(ValueError, match="no batch"):
        sm.HessianOperator(model, causal_lm_loss, [])
    with pytest.raises(sm.NonFiniteLossError):
        sm.HessianOperator(model, lambda m, b: causal_lm_loss(m, b) * float("nan"), batch)


def test_operator_follows_parameters_written_in_place():
    model = float64_gpt2().eval()
    batch = token_batch()
    op = sm.HessianOperator(model, causal_lm_loss, batch)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    before = op @ v
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1.5)
    fresh = sm.HessianOperator(model, causal_lm_loss, batch)
    after = op @ v
    assert relative_error(after, fresh @ v) < EXACT
    assert relative_error(after, before) > 1e-3
    assert torch.equal(op.gradient, fresh.gradient)


def small_hf_model(kind: str) -> torch.nn.Module:
    """A tiny Hugging Face model whose loss scores its labels each its own way."""
    import transformers

    torch.manual_seed(0)
    bert = {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2}
    bert.update(intermediate_size=8, vocab_size=VOCAB, num_labels=VOCAB)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_layers=1
        )
        config.decoder_start_token_id = config.pad_token_id = 0
        return transformers.T5ForConditionalGeneration(config)
    if kind == "bert_mlm":
        return transformers.BertForMaskedLM(transformers.BertConfig(**bert))
    if kind == "bert_ner":
        return transformers.BertForTokenClassification(transformers.BertConfig(**bert))
    return float64_gpt2().float()


def ragged_batch(batch_size: int, valid: int, seed: int) -> dict[str, torch.Tensor]:
    """Labels with ``valid`` loss tokens per row, the rest -100 (padding, unmasked tokens)."""
    batch = token_batch(batch_size, seed)
    labels = batch["labels"].clone()
    labels[:, valid:] = -100
    return {"input_ids": batch["input_ids"], "labels": labels}


@pytest.mark.parametrize("kind", ["gpt2", "t5", "bert_mlm", "bert_ner"])
def test_a_multi_batch_probe_weighs_batches_by_the_tokens_the_model_scores(kind):
    """Two micro-batches give the model's own loss of one concatenated batch: a causal LM
    scores labels[:, 1:], an encoder-decoder, a masked LM and a token classifier every label.
    Counting the shifted labels for those mixed these batches 1:14 (T5) instead of 1:8."""
    from sharpmeter.measure.loss import ProbeLoss

    model = small_hf_model(kind).eval()
    first, second = ragged_batch(2, valid=2, seed=3), ragged_batch(4, valid=SEQ, seed=4)
    together = {key: torch.cat([first[key], second[key]]) for key in first}
    with torch.no_grad():
        expected = float(model(**together).loss)
        measured = float(ProbeLoss(model, None, [first, second])())
    assert measured == pytest.approx(expected, rel=1e-6)


def test_a_micro_batch_without_loss_tokens_is_left_out():
    """A prompt-only micro-batch (completion-only training masks every label) has the mean loss
    0/0: it weighs nothing, and made the probe's loss and gradient NaN."""
    from sharpmeter.measure.loss import ProbeLoss, loss_and_gradient

    model = float64_gpt2()
    empty, full = ragged_batch(2, valid=1, seed=3), ragged_batch(4, valid=SEQ, seed=4)
    params = list(model.parameters())
    loss, grads = loss_and_gradient(ProbeLoss(model, causal_lm_loss, [empty, full]), params)
    expected_loss, expected = loss_and_gradient(ProbeLoss(model, causal_lm_loss, full), params)
    assert float(loss) == float(expected_loss)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))


def test_a_rank_whose_batches_have_no_loss_tokens_adds_nothing(monkeypatch):
    """Under data parallelism a rank may hold only prompt-only micro-batches while the others
    score 16 tokens: its share of the loss, the gradient and every HVP is 0. Before, it was
    NaN, which the sum over ranks made every rank's row nonfinite."""
    from sharpmeter.measure import loss as loss_module

    monkeypatch.setattr(loss_module, "all_reduce_sum", lambda total: total + 16.0)
    model = float64_gpt2()
    empty = ragged_batch(2, valid=1, seed=3)
    probe = loss_module.ProbeLoss(model, causal_lm_loss, [empty, empty], distributed=True)
    assert probe.weights == [0.0, 0.0]
    params = list(model.parameters())
    loss, grads = loss_module.loss_and_gradient(probe, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    assert float(loss) == 0.0
    assert all(not g.any() for g in grads) and all(not h.any() for h in hv)


class SquareOnce(torch.autograd.Function):
    """x^2 with a backward torch cannot differentiate again (``@once_differentiable``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class WeightNormed(torch.nn.Module):
    """tanh(W x + b) with W = g v / ||v|| per row, through torch's weight_norm or plain ops."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        self.first = torch.nn.Linear(5, 3).double()
        self.last = torch.nn.Linear(3, 3).double()
        if fused:
            torch.nn.utils.parametrizations.weight_norm(self.first)
        else:
            weight = self.first.weight.detach()
            del self.first.weight
            self.g = torch.nn.Parameter(weight.norm(dim=1, keepdim=True))
            self.v = torch.nn.Parameter(weight.clone())

    def forward(self, x):
        if self.fused:
            return self.last(torch.tanh(self.first(x)))
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return self.last(torch.tanh(torch.nn.functional.linear(x, weight, self.first.bias)))

    def ordered(self) -> list[torch.nn.Parameter]:
        """The parameters in the fused model's order: bias, g, v, then the last layer's."""
        if self.fused:
            return list(self.parameters())
        return [self.first.bias, self.g, self.v, *self.last.parameters()]


class Squared(torch.nn.Module):
    def __init__(self, once: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.once = once
        self.a, self.b = torch.nn.Linear(5, 4).double(), torch.nn.Linear(4, 3).double()

    def forward(self, x):
        h = self.a(x)
        return self.b(SquareOnce.apply(h) if self.once else h * h)

    def ordered(self) -> list[torch.nn.Parameter]:
        return list(self.parameters())


@pytest.mark.parametrize(
    ("build", "named"),
    [(WeightNormed, "weight_norm's fused kernel"), (Squared, "@once_differentiable")],
    ids=["weight_norm", "once_differentiable"],
)
def test_a_graph_whose_second_derivative_torch_gets_wrong_is_refused(build, named):
    """Double backward through these gave a wrong Hessian without a word (an asymmetric one,
    or the custom Function's part left out); the finite-difference mode is right, against the
    same function written with plain operations."""
    model, plain = build(True), build(False)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    assert loss_fn(model, (x, y)) == loss_fn(plain, (x, y))
    exact = dense_hessian(plain, loss_fn, (x, y), plain.ordered())
    v = torch.randn(exact.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{named}.*hvp_mode='fd'"):
        sm.HessianOperator(model, loss_fn, (x, y)) @ v
    fd = sm.HessianOperator(model, loss_fn, (x, y), mode="fd") @ v
    assert relative_error(fd, exact @ v) < 1e-6
    loss_fn(model, (x, y)).backward()
    meter = sm.SharpnessMeter(model, (x, y), loss_fn=loss_fn, measures=("critical", "trace"))
    row = meter.measure(0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert row["critical_status"] == "ok" and named in row["trace_status"]


PAD = 2


class PaddedTokens(torch.nn.Module):
    """Token ids -> ``nn.Embedding(padding_idx=PAD)`` -> tanh(linear) -> logits, the output
    layer's weight tied to the embedding's or its own."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(7, 3, padding_idx=PAD, dtype=torch.float64)
        self.hidden = torch.nn.Linear(3, 3, dtype=torch.float64)
        self.output = torch.nn.Linear(3, 7, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.embedding.weight[PAD].normal_()  # torch initialises it to 0; a loaded one is not
        if tied:
            self.output.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(self.embedding(ids))))


def padded_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, targets = batch
    return torch.nn.functional.cross_entropy(model(ids).reshape(-1, 7), targets.reshape(-1))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def padded_reference(request):
    """The model, a probe holding the padding id at scored positions, and the exact
    :math:`MHM`: the Hessian of the loss with the padding row an ordinary parameter (built
    column by column on a copy without ``padding_idx``), that row and column zeroed."""
    model = PaddedTokens(tied=request.param)
    ids = torch.tensor([[0, 4, PAD, 1, 6], [PAD, 3, 5, PAD, 1]])
    batch = (ids, torch.tensor([[3, 1, 0, 6, 2], [5, 2, 4, 1, 0]]))
    free = copy.deepcopy(model)
    free.embedding.padding_idx = None
    hessian = dense_hessian(free, padded_loss, batch)
    pad_row = slice(PAD * 3, PAD * 3 + 3)  # the embedding's weight comes first
    assert hessian[pad_row].norm() > 0.05 * hessian.norm()  # the padding id counts: the test bites
    keep = torch.ones(hessian.shape[0], dtype=torch.float64)
    keep[pad_row] = 0
    return model, batch, keep[:, None] * hessian * keep[None, :]


@pytest.mark.parametrize(
    ("mode", "products_per_call", "tolerance"),
    [
        ("double_backward", 1, EXACT),
        ("double_backward", 4, EXACT),
        ("fwd", 1, EXACT),
        ("fd", 1, FD),
    ],
)
def test_an_embeddings_padding_row_is_held_fixed_in_every_mode(
    padded_reference, mode, products_per_call, tolerance
):
    """``nn.Embedding``'s backward zeroes the padding row's gradient (mask :math:`M`): double
    backward gave :math:`MHM`, but jvp and finite differences move the row and gave the
    asymmetric :math:`MH` (Lanczos then converged to a wrong eigenvalue, status ok); with the
    weight tied to the output layer double backward gave yet another operator. Every mode is
    :math:`MHM` now, symmetric: :math:`u \\cdot Hv = v \\cdot Hu`."""
    model, batch, held_fixed = padded_reference
    op = sm.HessianOperator(
        model, padded_loss, batch, mode=mode, products_per_call=products_per_call
    )
    assert relative_error(op @ torch.eye(op.dim, dtype=torch.float64), held_fixed) < tolerance
    generator = torch.Generator().manual_seed(2)
    u, v = torch.randn(2, op.dim, generator=generator, dtype=torch.float64)
    scale = torch.linalg.matrix_norm(held_fixed, 2) * u.norm() * v.norm()
    assert abs(u @ (op @ v) - v @ (op @ u)) < tolerance * scale


class FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose backward reads the probabilities saved by the forward, as a
    fused kernel's does, marked ``@once_differentiable``."""

    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits.softmax(-1), targets)
        return torch.nn.functional.cross_entropy(logits, targets)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        probabilities, targets = ctx.saved_tensors
        residual = probabilities - torch.nn.functional.one_hot(targets, probabilities.shape[-1])
        return grad * residual / len(targets), None


class RecomputedCrossEntropy(torch.autograd.Function):
    """The same loss with a backward torch can differentiate: it recomputes the probabilities
    from the saved logits, which keep their graph."""

    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits, targets)
        return torch.nn.functional.cross_entropy(logits, targets)

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        residual = logits.softmax(-1) - torch.nn.functional.one_hot(targets, logits.shape[-1])
        return grad * residual / len(targets), None


def classifier_and_batch() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
    ).double()
    return model, (torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,)))


def through(function: type[torch.autograd.Function]):
    """The loss ``function(model(x), y)``: the custom Function is its last operation."""

    def loss_fn(model, batch):
        return function.apply(model(batch[0]), batch[1])

    return loss_fn


def plain_cross_entropy(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_a_once_differentiable_last_operation_of_the_loss_is_refused():
    """Its backward gets the constant 1 and computes from tensors saved without grad, so no
    DelayedError node marks it: the gradient's graph just ends there, and double backward
    dropped the Gauss-Newton part of the Hessian (trace -0.45 for 2.11, status ok). The
    loss's own graph shows it; finite differences measure it right."""
    model, batch = classifier_and_batch()
    exact = dense_hessian(model, plain_cross_entropy, batch)
    fused = through(FusedCrossEntropy)
    v = torch.randn(exact.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for reuse_graph in (True, False):
        with pytest.raises(ValueError, match="@once_differentiable.*hvp_mode='fd'"):
            sm.HessianOperator(model, fused, batch, reuse_graph=reuse_graph) @ v
    fd = sm.HessianOperator(model, fused, batch, mode="fd") @ v
    assert relative_error(fd, exact @ v) < FD
    plain_cross_entropy(model, batch).backward()
    meter = sm.SharpnessMeter(model, batch, loss_fn=fused, measures=("critical", "trace"))
    row = meter.measure(0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert row["critical_status"] == "ok" and "@once_differentiable" in row["trace_status"]


@pytest.mark.parametrize("reuse_graph", [True, False])
def test_custom_functions_whose_second_derivative_holds_are_not_refused(reuse_graph):
    """Controls: a custom Function with a differentiable backward as the loss's last
    operation; and a @once_differentiable one whose backward the gradient never runs (no
    measured parameter lies below it). Both give the exact Hessian (block)."""
    model, batch = classifier_and_batch()
    exact = dense_hessian(model, plain_cross_entropy, batch)
    v = torch.randn(exact.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    op = sm.HessianOperator(model, through(RecomputedCrossEntropy), batch, reuse_graph=reuse_graph)
    assert relative_error(op @ v, exact @ v) < EXACT

    squared, plain = Squared(once=True), Squared(once=False)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    block = dense_hessian(plain, plain_cross_entropy, (x, y), list(plain.b.parameters()))
    op = sm.HessianOperator(
        squared, plain_cross_entropy, (x, y), params=squared.b.parameters(), reuse_graph=reuse_graph
    )
    w = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert relative_error(op @ w, block @ w) < EXACT


def test_a_negative_padding_idx_set_after_construction_is_counted_from_the_end():
    """torch normalises -1 only in the constructor: set later, the mask was an empty slice and
    fwd/fd were asymmetric again."""
    from sharpmeter.measure.operators import padding_rows

    embedding = torch.nn.Embedding(6, 3)
    embedding.padding_idx = -1
    assert padding_rows(embedding, [embedding.weight]) == [slice(15, 18)]

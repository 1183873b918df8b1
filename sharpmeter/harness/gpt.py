"""GPT-2-style models built from a config (no weights downloaded), in named sizes.

Two ladders: a CPU one of five sizes spanning about two decades of parameters (the README's
main job trains it in minutes on two cores) and a sixth, ``xxlarge`` (~3.2M), that takes the
claims study to 2.6 decades; and a GPU one from ~14M to ~210M parameters (with an 8K-token BPE
vocabulary). A size is ``(n_embd, n_layer, n_head)``; the parameter count follows from it,
the vocabulary and the context length, and is what the analysis uses.

Example::

    model = build_gpt("small", vocab_size=256, block_size=64)
    sum(p.numel() for p in model.parameters())          # 35,712
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import GPT2Config, GPT2LMHeadModel


class GptShape(NamedTuple):
    n_embd: int
    n_layer: int
    n_head: int


CPU_SIZES = {
    "tiny": GptShape(16, 1, 2),
    "small": GptShape(32, 2, 2),
    "medium": GptShape(64, 2, 4),
    "large": GptShape(96, 3, 4),
    "xlarge": GptShape(128, 4, 4),
    "xxlarge": GptShape(256, 4, 8),
}
# Named by shape: their parameter counts depend on the vocabulary.
GPU_SIZES = {
    "d384-l6": GptShape(384, 6, 6),
    "d512-l8": GptShape(512, 8, 8),
    "d768-l12": GptShape(768, 12, 12),
    "d1024-l16": GptShape(1024, 16, 16),
}
SIZES = {**CPU_SIZES, **GPU_SIZES}
# GPT-2's context length (its n_positions): every size is a GPT-2 shape and takes at most this
# many positions. A model is built with exactly block_size of them, and attention's memory
# grows with its square, so a longer block is refused rather than left to run out of memory.
MAX_POSITIONS = 1024

# Floats a measurement keeps per probe token, fitted generously to peak memory on CPU (fp32,
# Hugging Face's eager GPT-2, the math attention kernel; sizes tiny to d384-l6, blocks of 64
# to 256): per layer and hidden unit (measured 42-60: the MLP's 4x width and GELU's
# intermediates), per layer, head and attended position (~1), per vocabulary entry (~2.5).
_FLOATS_PER_HIDDEN = 64
_FLOATS_PER_SCORE = 2
_FLOATS_PER_LOGIT = 3
# A Hessian-vector product keeps the gradient's own graph and differentiates it again
# (measured 2.7-3.3 times the peak of one gradient).
_DOUBLE_BACKWARD_FACTOR = 4
_BYTES_PER_FLOAT = 4


def check_size(name: str) -> GptShape:
    """The shape of a named size; ``ValueError`` naming the choices for an unknown one."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose from {', '.join(SIZES)}")
    return SIZES[name]


def check_positions(block_size: int) -> None:
    """A ValueError if a block is longer than GPT-2's context length (:data:`MAX_POSITIONS`),
    the most this harness builds: a policy, since the model gets ``block_size`` positions."""
    if block_size > MAX_POSITIONS:
        raise ValueError(
            f"block_size {block_size} is longer than GPT-2's context length of {MAX_POSITIONS} "
            "tokens, the most this harness builds"
        )


def probe_memory_bytes(
    size: str, block_size: int, vocab_size: int, probe_size: int, double_backward: bool
) -> int:
    """A generous estimate of the memory one measurement holds for its probe batch, so that a
    probe too large for the machine is refused before training instead of being killed by
    the OOM killer at the first measurement.

    With ``L`` layers, hidden size ``d``, ``h`` heads, block ``T`` and vocabulary ``V``::

        bytes = 4 * k * probe_size * T * (L * (64 d + 2 h T) + 3 V)

    4 bytes per float (fp32, even where bf16 autocast would keep less), ``k = 4`` with a
    double backward (the HVP measures) and 1 without (critical sharpness: forward passes and
    one gradient); the per-token constants are those above this function, and the peaks
    measured on CPU are 0.55-0.9 of this estimate. Weights and optimizer state, which
    training holds anyway, are not counted.
    """
    shape = check_size(size)
    per_layer = _FLOATS_PER_HIDDEN * shape.n_embd + _FLOATS_PER_SCORE * shape.n_head * block_size
    per_token = shape.n_layer * per_layer + _FLOATS_PER_LOGIT * vocab_size
    factor = _DOUBLE_BACKWARD_FACTOR if double_backward else 1
    return _BYTES_PER_FLOAT * factor * probe_size * block_size * per_token


def gpt_config(
    size: str,
    vocab_size: int,
    block_size: int,
    dropout: float = 0.0,
    attn_implementation: str = "sdpa",
) -> GPT2Config:
    """A ``GPT2Config`` of a named size. Dropout is 0 by default: a small model trained for a
    few hundred steps does not need it, and the measurement turns it off anyway."""
    shape = check_size(size)
    check_positions(block_size)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = attn_implementation
    return config


def build_gpt(size: str, vocab_size: int, block_size: int, **options) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of a named size (``options`` go to :func:`gpt_config`)."""
    return GPT2LMHeadModel(gpt_config(size, vocab_size, block_size, **options))

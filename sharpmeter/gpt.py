"""GPT-2-style models built from a config (no weights downloaded), in named sizes.

Two ladders: a CPU one of five sizes spanning about two decades of parameters (the README's
main job trains it in minutes on two cores), and a GPU one from ~14M to ~210M parameters (with
an 8K-token BPE vocabulary). A size is ``(n_embd, n_layer, n_head)``; the parameter count
follows from it, the vocabulary and the context length, and is what the analysis uses.

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
}
# Named by shape: their parameter counts depend on the vocabulary.
GPU_SIZES = {
    "d384-l6": GptShape(384, 6, 6),
    "d512-l8": GptShape(512, 8, 8),
    "d768-l12": GptShape(768, 12, 12),
    "d1024-l16": GptShape(1024, 16, 16),
}
SIZES = {**CPU_SIZES, **GPU_SIZES}


def check_size(name: str) -> GptShape:
    """The shape of a named size; ``ValueError`` naming the choices for an unknown one."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose from {', '.join(SIZES)}")
    return SIZES[name]


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

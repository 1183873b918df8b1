"""What the line search's resolution checks cost (critical sharpness, step 5).

A step is tried only where the loss can tell its rise from rounding; that asks, once per search,
a bound over the parameters (``_LineSearch.surely_faithful``, four norms) and, for steps below
the bound, an exact pass (``stores_faithfully``: the step as the parameters store it). This
script times both inside real searches of a GPT-2 after a few AdamW steps, in float32 and bf16,
called as the meter calls it (the model's ``labels=`` loss, which Hugging Face computes in
float32 for a bf16 model; the probe's loss and gradient given), from a cold start (the learning
rate) and from warm starts around the critical step, and sets them beside the search's forwards.

    python -m benchmarks.resolution --sizes 1M,10M
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sharpmeter as sm
from benchmarks._common import (
    GPT2_SIZES,
    RESULTS,
    command_line,
    fmt,
    gpt2,
    header,
    markdown_table,
    median,
    num_params,
    save_markdown,
    timed,
    token_batch,
)
from sharpmeter.measure import linesearch

LR = 1e-3
WARM = (3.0, 1.3, 1.0, 0.7)  # warm starts, times the critical step the cold search found
CHECKS = ("surely_faithful", "stores_faithfully")


class CheckTimer:
    """Wraps the resolution checks of ``_LineSearch`` to add up their calls and seconds."""

    def __init__(self) -> None:
        self.calls = dict.fromkeys(CHECKS, 0)
        self.seconds = 0.0
        self.originals = {name: getattr(linesearch._LineSearch, name) for name in CHECKS}

    def __enter__(self) -> CheckTimer:
        for name, original in self.originals.items():
            setattr(linesearch._LineSearch, name, self.timed(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            setattr(linesearch._LineSearch, name, original)

    def timed(self, name: str, original: Callable) -> Callable:
        def wrapper(search: object, *args: object) -> object:
            start = time.perf_counter()
            try:
                return original(search, *args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls[name] += 1

        return wrapper


def trained(size: str, dtype: torch.dtype, batch_size: int, seq_len: int) -> tuple:
    """The GPT-2 after 3 AdamW steps, its probe, the probe's loss and gradient, the update."""
    model = gpt2(GPT2_SIZES[size], dtype)
    vocab = model.config.vocab_size
    seq_len = min(seq_len, model.config.n_positions)  # the 1K model has 8 positions
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for seed in range(3):
        model(**token_batch(vocab, batch_size, seq_len, seed=10 + seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    probe = token_batch(vocab, batch_size, seq_len)
    loss = model(**probe).loss
    loss.backward()
    direction = sm.update_direction(optimizer)
    gradient = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    return model, probe, float(loss), gradient, direction


def measure(size: str, dtype: torch.dtype, args: argparse.Namespace) -> list[list[str]]:
    """One row per search: start, status, forwards, search seconds, check calls and seconds."""
    model, probe, loss, gradient, direction = trained(size, dtype, args.batch_size, args.seq_len)
    with torch.no_grad():
        forward = median(timed(lambda: model(**probe).loss, repeats=3))

    def search(eta0: float) -> tuple[linesearch.CriticalSharpnessResult, float, CheckTimer]:
        with CheckTimer() as checks:
            start = time.perf_counter()
            result = sm.critical_sharpness(
                model, None, probe, direction, eta0=eta0, gradient=gradient, loss=loss
            )
            seconds = time.perf_counter() - start
        return result, seconds, checks

    cold = search(LR)
    eta_c = cold[0].eta_c
    searches = [("cold (lr)", *cold)]
    if eta_c == eta_c:  # a warm start needs a critical step
        searches += [(f"warm {w} eta_c", *search(w * eta_c)) for w in WARM]
    name = f"GPT-2 {size} ({num_params(model):,}), {str(dtype).removeprefix('torch.')}"
    rows = []
    for start, result, seconds, checks in searches:
        rows.append(
            [
                name,
                start,
                result.status,
                fmt(result.value),
                str(result.num_forward),
                fmt(forward),
                fmt(seconds),
                str(checks.calls["stores_faithfully"]),
                fmt(checks.seconds),
                f"{checks.seconds / seconds:.1%}",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resolution", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="1M,10M", help="comma-separated: 1K, 1M, 10M")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "resolution.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            print(f"GPT-2 {size} {dtype}", flush=True)
            rows += measure(size, dtype, args)
    columns = [
        "model",
        "start",
        "status",
        "lambda_c",
        "forwards",
        "s / forward",
        "s / search",
        "exact checks",
        "s in checks",
        "share of search",
    ]
    extra = [
        f"batch {args.batch_size} x {args.seq_len} random tokens, eval mode, dropout 0, "
        f"{args.threads} torch thread(s); 3 AdamW steps (lr {LR}) before the searches",
        "the meter's call: the model's labels= loss (float32), the probe's loss and gradient "
        "given; checks: surely_faithful once "
        "per search plus every exact stores_faithfully, wall time inside the search",
    ]
    lines = header("Cost of the line search's resolution checks", command_line(), extra)
    save_markdown(args.out, lines + markdown_table(columns, rows))


if __name__ == "__main__":
    main()

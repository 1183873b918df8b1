"""Shared helpers of the benchmark scripts: models, batches, timing, peak RSS, the machine.

Peak memory on CPU is the peak resident set size (``resource.getrusage(...).ru_maxrss``) of a
*fresh* process that does one thing: torch's allocator goes through ``malloc``, which
``tracemalloc`` does not see, and a process's peak never goes down, so every memory figure comes
from its own subprocess (see :func:`run_worker`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GPT2Size:
    """A GPT-2 shape; ``n_positions`` equals the sequence length of the benchmark batch."""

    name: str
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 128


# Named by parameter count (tied embeddings counted once): ~1K (1,080; the tests' float64_gpt2
# shape, not the harness's "tiny"), ~1M and ~10M. Small vocabularies keep most parameters in the
# transformer blocks, as in a real GPT-2, instead of in the embedding table.
GPT2_SIZES = {
    "1K": GPT2Size("1K", vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8),
    "1M": GPT2Size("1M", vocab_size=2048, n_embd=128, n_layer=4, n_head=4),
    "10M": GPT2Size("10M", vocab_size=8192, n_embd=256, n_layer=10, n_head=8),
}


def gpt2(size: GPT2Size, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (no weights downloaded), dropout off, eval."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=size.vocab_size,
        n_positions=size.n_positions,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def describe_gpt2(size: GPT2Size, n_params: int) -> str:
    """The results files' model line: name, parameters and shape of a float32 GPT-2 without
    dropout."""
    return (
        f"model: GPT-2 {size.name}, {n_params:,} parameters (n_embd {size.n_embd}, n_layer "
        f"{size.n_layer}, n_head {size.n_head}, vocab {size.vocab_size}), float32, dropout 0"
    )


def token_batch(
    vocab_size: int, batch_size: int, seq_len: int, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Random token ids (``labels = input_ids``), from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def python_module(module: str, python: str | None = None) -> list[str]:
    """The command that runs ``python -m module`` (this interpreter unless ``python``).

    Children run from the repository root, where ``benchmarks`` is importable (pass ``cwd=REPO``).
    """
    return [python or sys.executable, "-m", module]


def run_worker(module: str, spec: dict, python: str | None = None, timeout: float = 900) -> dict:
    """Run ``python -m module --worker JSON`` in a fresh interpreter; return its last JSON line.

    A fresh process per measurement is what makes its ``ru_maxrss`` the peak of that one method.
    Errors come back as ``{"error": ...}`` so that one failing method does not stop a table.
    """
    command = [*python_module(module, python), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {done.returncode}"}
    return json.loads(lines[-1])


def machine_description() -> str:
    """CPU model, logical cores, RAM, the GPU, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical cores (shared), {ram:.0f} GiB RAM, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def header(title: str, command: str, extra: list[str] | None = None) -> list[str]:
    """The Markdown preamble of a results file: title, command, date, machine, versions."""
    import transformers

    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine_description()}",
        f"- transformers {transformers.__version__}",
    ]
    return lines + [f"- {line}" for line in extra or []] + [""]


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (first column left-aligned, the others right-aligned)."""
    align = [":---"] + ["---:"] * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, or an en dash when missing."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}g}"


def command_line() -> str:
    """How this benchmark was called: ``python -m benchmarks.<name> ARGS``."""
    module = sys.modules["__main__"].__spec__.name.removesuffix(".__main__")
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def save_markdown(path: Path, lines: list[str]) -> None:
    """Write a Markdown results file (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")

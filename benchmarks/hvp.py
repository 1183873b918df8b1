"""Cost of one Hessian-vector product against one gradient, on ~1M and ~10M-parameter GPT-2s.

Seconds per gradient, per training step and per HVP in every ``HessianOperator`` mode and with
products batched in one backward (``products_per_call``), and the peak memory of each (issues 2
and 15); what is measured and how: ``benchmarks/README.md``.

    python -m benchmarks.hvp                            # both sizes, writes results/hvp.md
    python -m benchmarks.hvp --sizes 1M --repeats 3
    python -m benchmarks.hvp --device cuda --out benchmarks/results/hvp_cuda.md
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    peak_rss_mib,
    run_worker,
    save_markdown,
    token_batch,
)
from sharpmeter.measure.loss import causal_lm_loss

# What the workers re-invoke, from the repository root.
MODULE = "benchmarks.hvp"
# Hutchinson's default probes, all in one batched backward.
BATCH = 8
METHODS = {
    "baseline": "baseline (model + batch only)",
    "grad": "gradient, default attention",
    "grad_math": "gradient, SDPA math kernel",
    "train_step": "training step (fwd + bwd + AdamW)",
    "db_build": "double_backward, reuse: construction",
    "db_reuse": "HVP double_backward, graph reused",
    "db_noreuse": "HVP double_backward, no reuse",
    "fwd": "HVP fwd (jvp of grad)",
    "fd": "HVP fd (central differences)",
    "db_batched": f"HVP double_backward, {BATCH} per batched call (per HVP)",
}
HVP_MODES = {
    "db_reuse": ("double_backward", True),
    "db_noreuse": ("double_backward", False),
    "fwd": ("fwd", True),
    "fd": ("fd", True),
}
# Methods whose one call makes several products; their seconds are per product.
PRODUCTS = {"db_batched": BATCH}
COMPARED = [*HVP_MODES, "db_batched"]  # methods whose Hv is compared with db_reuse's
TIMED = [m for m in METHODS if m != "baseline"]
# db_build's memory is part of db_reuse's (the worker builds, then multiplies).
MEMORY = [m for m in METHODS if m != "db_build"]


def make_call(method: str, model: torch.nn.Module, batch: dict) -> Callable[[], object]:
    """A zero-argument callable doing one unit of ``method``; setup (an operator) is done here."""
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "baseline":
        return lambda: None
    if method == "grad":
        return lambda: torch.autograd.grad(causal_lm_loss(model, batch), params)
    if method == "grad_math":

        def grad_math() -> object:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.autograd.grad(causal_lm_loss(model, batch), params)

        return grad_math
    if method == "train_step":
        return make_train_step(copy.deepcopy(model).train(), batch)
    if method == "db_build":
        # Built and dropped at once: at most one extra graph is alive.
        return lambda: sm.HessianOperator(model, causal_lm_loss, batch)
    if method == "db_batched":
        op = sm.HessianOperator(model, causal_lm_loss, batch, products_per_call=BATCH)
        block = torch.randn(op.dim, BATCH, generator=torch.Generator().manual_seed(0))
        block[:, 0] = probe_vector(op.dim)  # the others' v, for the comparison
        block = block.to(op.device)
        return lambda: op @ block
    mode, reuse = HVP_MODES[method]
    if mode == "fd":
        # fd writes the parameters (and restores them): on a shared model that would bump their
        # versions and make the graph-reusing operator rebuild its graph at every product.
        model = copy.deepcopy(model)
    op = sm.HessianOperator(model, causal_lm_loss, batch, mode=mode, reuse_graph=reuse)
    v = probe_vector(op.dim).to(op.device)
    return lambda: op @ v


def probe_vector(dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(0))


def make_train_step(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        causal_lm_loss(model, batch).backward()
        optimizer.step()

    return step


def setup(spec: dict) -> tuple:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = gpt2(GPT2_SIZES[spec["size"]]).to(device)
    # The 1K model has 8 positions: longer sequences would index past its position table.
    length = min(spec["seq_len"], model.config.n_positions)
    batch = token_batch(model.config.vocab_size, spec["batch_size"], length)
    return model, {key: value.to(device) for key, value in batch.items()}


def finished(call: Callable[[], object], device: str) -> Callable[[], object]:
    """``call``, returning once the device has done its work (CUDA runs asynchronously)."""
    if device != "cuda":
        return call

    def synchronised() -> object:
        output = call()
        torch.cuda.synchronize()
        return output

    return synchronised


def time_round_robin(spec: dict) -> dict:
    """Worker: every timed method, one call each per round; seconds per method and round."""
    model, batch = setup(spec)
    calls = {method: finished(make_call(method, model, batch), spec["device"]) for method in TIMED}
    seconds: dict[str, list[float]] = {method: [] for method in TIMED}
    outputs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for round_index in range(spec["repeats"] + 1):  # round 0 warms up
            for method, call in calls.items():
                start = time.perf_counter()
                outputs[method] = call()
                elapsed = time.perf_counter() - start
                if round_index:
                    seconds[method].append(elapsed / PRODUCTS.get(method, 1))
    reference = outputs["db_reuse"]
    outputs["db_batched"] = outputs["db_batched"][:, 0]
    difference = {
        method: float(torch.linalg.vector_norm(outputs[method] - reference) / reference.norm())
        for method in COMPARED
    }
    return {
        "params": num_params(model),
        "seconds": seconds,
        "difference": difference,
        "fallback": fallback(caught),
    }


def fallback(caught: list[warnings.WarningMessage]) -> str | None:
    """The operator's warning that its batched products fell back to single ones: the batched
    row then timed single products, and must say so."""
    messages = [str(w.message) for w in caught if "batched Hessian-vector" in str(w.message)]
    return messages[0] if messages else None


def peak_memory(spec: dict) -> dict:
    """Worker: build the model, run one method (warm-up + 2 calls) and report the peak memory:
    the process's RSS on a CPU, CUDA's allocated memory on a GPU."""
    model, batch = setup(spec)
    call = finished(make_call(spec["method"], model, batch), spec["device"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            call()
    failure = fallback(caught)
    if failure:
        return {"error": failure}
    if spec["device"] == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mib": peak_rss_mib()}


def run_size(size: str, args: argparse.Namespace) -> dict:
    """Timings (one round-robin process) and peak memory (one process per method) for one
    size."""
    spec = {
        "size": size,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "device": args.device,
    }
    timing = run_worker(MODULE, {**spec, "worker": "time", "repeats": args.repeats})
    if "error" in timing:
        raise SystemExit(f"timing worker failed on GPT-2 {size}: {timing['error']}")
    print(f"  {size}: timed {len(TIMED)} methods x {args.repeats} rounds", flush=True)
    memory = {}
    for method in MEMORY:
        memory[method] = run_worker(MODULE, {**spec, "worker": "memory", "method": method})
        shown = memory[method].get("error") or f"{memory[method]['peak_mib']:.0f} MiB"
        print(f"  {size}: peak memory {method:<11} {shown}", flush=True)
    return {**timing, "memory": memory}


def rss(result: dict, method: str) -> float:
    return result["memory"].get(method, {}).get("peak_mib", float("nan"))


def size_table(size: str, result: dict) -> list[str]:
    """Seconds, x gradient, peak memory and x training step for every method of one size."""
    seconds = {m: median(s) for m, s in result["seconds"].items()}
    baseline, train = rss(result, "baseline"), rss(result, "train_step")
    rows = []
    for method, label in METHODS.items():
        s = seconds.get(method, float("nan"))
        spread = result["seconds"].get(method, [])
        peak = rss(result, method) if method in MEMORY else float("nan")
        error = result["memory"].get(method, {}).get("error")
        difference = result["difference"].get(method)
        rows.append(
            [
                label,
                "–" if difference is None else f"{difference:.1e}",
                fmt(s),
                f"{fmt(min(spread))}–{fmt(max(spread))}" if spread else "–",
                fmt(s / seconds["grad"], 2),
                fmt(s / seconds["grad_math"], 2),
                f"error: {error}" if error else fmt(peak, 4),
                fmt(peak - baseline, 3),
                fmt(peak / train, 2),
                fmt((peak - baseline) / (train - baseline), 2),
            ]
        )
    columns = [
        "method",
        "Hv rel. diff",
        "s / call (median)",
        "range",
        "x grad",
        "x grad (math)",
        "peak memory MiB",
        "over baseline MiB",
        "x train step",
        "x train step (over baseline)",
    ]
    return [f"## GPT-2 {size} ({result['params']:,} parameters)", ""] + markdown_table(
        columns, rows
    )


def targets_table(results: dict[str, dict]) -> list[str]:
    """The two issue-2 targets per size, as ratios measured in this run."""
    rows = []
    for size, result in results.items():
        seconds = {m: median(s) for m, s in result["seconds"].items()}
        speed = seconds["db_reuse"] / seconds["grad"]
        speed_math = seconds["db_reuse"] / seconds["grad_math"]
        train = rss(result, "train_step")
        worst_mode = max(HVP_MODES, key=lambda m: rss(result, m))
        memory = rss(result, worst_mode) / train
        reuse_memory = rss(result, "db_reuse") / train
        rows.append(
            [
                f"GPT-2 {size}",
                f"{speed:.2f}x ({'met' if speed <= 2.5 else 'NOT met'})",
                f"{speed_math:.2f}x",
                f"{reuse_memory:.2f}x ({'met' if reuse_memory <= 2.0 else 'NOT met'})",
                f"{memory:.2f}x, {worst_mode} ({'met' if memory <= 2.0 else 'NOT met'})",
            ]
        )
    columns = [
        "model",
        "HVP (reuse) / gradient: target <= 2.5x",
        "HVP (reuse) / gradient (math kernel)",
        "HVP (reuse) peak memory / training step: target <= 2x",
        "worst mode's peak memory / training step",
    ]
    return ["## Targets", ""] + markdown_table(columns, rows)


def batched_table(results: dict[str, dict]) -> list[str]:
    """Issue 15 item 5: seconds and memory per HVP, batched in one backward against single."""
    rows = []
    for size, result in results.items():
        if result["fallback"]:
            rows.append([f"GPT-2 {size}", f"fell back: {result['fallback']}", *["–"] * 5])
            continue
        single = median(result["seconds"]["db_reuse"])
        batched = median(result["seconds"]["db_batched"])
        baseline = rss(result, "baseline")
        rows.append(
            [
                f"GPT-2 {size}",
                fmt(single),
                fmt(batched),
                f"{single / batched:.2f}x",
                f"{result['difference']['db_batched']:.1e}",
                f"{fmt(rss(result, 'db_reuse'), 4)} / {fmt(rss(result, 'db_batched'), 4)}",
                fmt((rss(result, "db_batched") - baseline) / (rss(result, "db_reuse") - baseline)),
            ]
        )
    columns = [
        "model",
        "s / HVP, single",
        f"s / HVP, {BATCH} per call",
        "speed-up of batching",
        "Hv rel. diff",
        "peak MiB, single / batched",
        "batched / single, over baseline",
    ]
    return [f"## Batched HVPs ({BATCH} per backward, issue 15)", ""] + markdown_table(columns, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="1M,10M", help="comma-separated: 1K, 1M, 10M")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS / "hvp.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        worker = time_round_robin if spec.pop("worker") == "time" else peak_memory
        print(json.dumps(worker(spec)))
        return

    sizes = args.sizes.split(",")
    results = {}
    for size in sizes:
        print(f"GPT-2 {size}", flush=True)
        results[size] = run_size(size, args)
    extra = [
        f"batch {args.batch_size} x {args.seq_len} random tokens, float32, eval mode, dropout 0, "
        f"on {args.device}, {args.threads} torch thread(s)",
        f"seconds: median of {args.repeats} round-robin rounds after a warm-up round, all methods "
        "in one process; peak memory: of a fresh subprocess per method, ru_maxrss on a CPU, "
        "torch.cuda.max_memory_allocated on a GPU",
        "x grad: over one gradient with the default attention kernel (what training runs); "
        "x grad (math): over one gradient under the SDPA math kernel, which every HVP needs",
        "Hv rel. diff: ||Hv - Hv_double_backward|| / ||Hv_double_backward|| for the same v "
        "(float32; the float64 accuracy against a dense Hessian is in peers.md)",
    ]
    lines = header("HVP cost against a gradient (issue 2)", command_line(), extra)
    lines += targets_table(results)
    lines += batched_table(results)
    for size in sizes:
        lines += size_table(size, results[size])
    print("\n".join(lines))
    save_markdown(args.out, lines)


if __name__ == "__main__":
    main()

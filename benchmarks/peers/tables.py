"""The Markdown tables of ``results/peers.md``, one function per section."""

from __future__ import annotations

import statistics

from benchmarks._common import fmt, markdown_table, median


def pct(value: float | None) -> str:
    if value is None or value != value:
        return "–"
    return f"{100 * value:.2g}%" if value >= 1e-4 else f"{value:.1e}"


def accuracy_tables(name: str, result: dict, args) -> list[str]:
    lines = [
        f"### {name} ({result['params']:,} parameters, float64)",
        "",
        f"Dense reference ({result['dense_seconds']:.0f} s): lambda_max = "
        f"{result['lambda_max']:.6g}, lambda_2 = {result['lambda_2']:.6g}, lambda_min = "
        f"{result['lambda_min']:.6g}, trace = {result['trace']:.6g}.",
        "",
    ]
    for tool, error in result["build_errors"].items():
        lines += [f"- {tool} could not be built: {error}", ""]
    rows = [[tool, pct(err)] for tool, err in result["hvp_error"].items()]
    lines += ["HVP relative error (worst of 3 Gaussian vectors):", ""]
    lines += markdown_table(["tool", "rel. error of Hv"], rows)

    budgets = args.eigen_budgets
    rows = [
        [f"{r['tool']} {r['method']}"]
        + [pct(r["error"][str(b)]) for b in budgets]
        + ["/".join(f"{r['hvps'][str(b)]:g}" for b in budgets)]
        for r in result["eigen"]
    ]
    lines += [
        f"lambda_max relative error at equal HVP budgets (median of {args.seeds} random starts;"
        " curvlinops: ARPACK `eigsh(ncv=budget, maxiter=1)`, which spends more than the budget "
        "and returns nothing (–) when no Ritz value converged):",
        "",
    ]
    lines += markdown_table(
        ["tool, method"] + [f"{b} HVPs" for b in budgets] + ["HVPs actually spent"], rows
    )

    budgets = args.trace_budgets
    rows = [
        [f"{r['tool']} {r['method']}"] + [pct(r["error"][str(b)]) for b in budgets]
        for r in result["trace_budget"]
    ]
    lines += [
        f"Trace relative error at equal HVP budgets (RMS over {args.trace_seeds} probe sets; "
        "the same seed gives sharpmeter, PyHessian and hessian-eigenthings the same Rademacher "
        "probes):",
        "",
    ]
    lines += markdown_table(["tool, method"] + [f"{b} HVPs" for b in budgets], rows)

    rows = []
    for r in result["defaults"]:
        if "value" not in r:
            rows.append([r["tool"], r["kind"], r["call"], "–", "–", "–", "–"])
            continue
        rows.append(
            [
                r["tool"],
                r["kind"],
                f"`{r['call']}`",
                fmt(r["value"], 6),
                pct(r["error"]),
                str(r["hvps"]),
                fmt(r["seconds"], 2),
            ]
        )
    lines += ["Each tool's defaults:", ""]
    lines += markdown_table(
        ["tool", "quantity", "call", "value", "rel. error", "HVPs", "seconds"], rows
    )
    return lines


def convergence_table(name: str, result: dict, args) -> list[str]:
    def show(values: list | None, digits: int = 3) -> str:
        if not values:
            return "n/a"
        if any(v is None for v in values):
            return "not reached"
        return fmt(statistics.median(values), digits)

    rows = []
    for r in result["convergence"]:
        horizon = "own rule" if r["tool"] == "curvlinops" else f"{r['horizon']}"
        rows.append(
            [
                f"{r['tool']} {r['method']}",
                show(r.get("cold_hvps")),
                show(r.get("cold_seconds"), 2),
                show(r.get("warm_hvps")),
                show(r.get("warm_seconds"), 2),
                horizon,
            ]
        )
    lines = [
        f"### {name}: HVPs to lambda_max within {args.tol:g} (relative)",
        "",
        f"cold: median over {args.convergence_seeds} random starts; warm: started from the top "
        "eigenvector of the previous training step. 'not reached': not within the horizon. "
        "curvlinops (scipy ARPACK) is run with its own stopping rule `eigsh(tol)`.",
        "",
    ]
    lines += markdown_table(
        ["tool, method", "cold HVPs", "cold s", "warm HVPs", "warm s", "horizon"], rows
    )
    rows = [
        [
            f"{r['tool']} {r['method']}",
            str(r["budget"]) if r["budget"] else f"> {args.trace_max_budget}",
            pct(r.get("stderr")),
            pct(r.get("error")),
            fmt(r.get("seconds"), 2),
        ]
        for r in result["trace_stderr"]
    ]
    lines += [
        f"Trace to a standard error <= {100 * args.trace_rel_stderr:g}% of the trace (mean over "
        f"{args.stderr_seeds} probe sets; budgets doubling from 12; PyHessian's stderr computed "
        "here from its samples; curvlinops reports none; seconds per estimate):",
        "",
    ]
    lines += markdown_table(
        ["tool, method", "HVPs", "mean rel. stderr", "RMS rel. error", "seconds"], rows
    )
    return lines


def speed_tables(speed: dict, memory: dict) -> list[str]:
    lines = []
    for name, result in speed.items():
        if "error" in result:
            lines += [f"### {name}: error {result['error']}", ""]
            continue
        seconds = {tool: median(s) for tool, s in result["seconds"].items()}
        base = seconds["sharpmeter"]
        rows = []
        for tool, s in seconds.items():
            rss = memory.get(name, {}).get(tool, {})
            rows.append(
                [
                    tool,
                    fmt(s),
                    fmt(s / base, 3) if tool != "gradient" else "–",
                    fmt(s / seconds["gradient"], 3),
                    fmt(median(result["build_seconds"].get(tool, [])), 3),
                    fmt(median(result["first_seconds"].get(tool, [])), 3),
                    rss.get("error") or fmt(rss.get("peak_rss_mib"), 4),
                ]
            )
        for extra in ("baseline", "training step"):
            rss = memory.get(name, {}).get(extra, {})
            rows.append([extra, "–", "–", "–", "–", "–", fmt(rss.get("peak_rss_mib"), 4)])
        lines += [f"### {name} ({result['params']:,} parameters, float32)", ""]
        lines += markdown_table(
            [
                "tool",
                "s / HVP (median)",
                "x sharpmeter",
                "x gradient",
                "construction s",
                "first HVP after it, s",
                "peak RSS MiB",
            ],
            rows,
        )
    return lines


def critical_table(critical: dict) -> list[str]:
    rows = []
    for name, r in critical.items():
        if "error" in r:
            rows.append([name, f"error: {r['error']}"] + [""] * 6)
            continue
        for label in ("cold", "warm"):
            c = r[label]
            rows.append(
                [
                    name,
                    f"critical_sharpness, {label} (eta0 = {c['eta0']:.3g})",
                    str(c["forwards"]),
                    fmt(c["seconds"], 3),
                    fmt(c["seconds"] / r["forward_seconds"], 3),
                    fmt(c["value"], 5),
                    c["status"],
                ]
            )
        d = r["directional"]
        rows.append(
            [
                name,
                f"directional_sharpness (build + 1 HVP; first call {d['first_seconds']:.2g} s)",
                "–",
                fmt(d["seconds"], 3),
                fmt(d["seconds"] / r["forward_seconds"], 3),
                fmt(d["value"], 5),
                "",
            ]
        )
    return markdown_table(
        ["model", "measurement", "forwards", "seconds", "x one forward", "value", "status"], rows
    )


def side_effect_table(accuracy: dict) -> list[str]:
    rows = []
    for name, result in accuracy.items():
        for tool, effects in result.get("side_effects", {}).items():
            rows.append(
                [
                    name,
                    tool,
                    *("yes" if effects[key] else "no" for key in ("mode", "grad", "params", "rng")),
                    effects["math_kernel"],
                ]
            )
    return markdown_table(
        [
            "model",
            "tool",
            "train/eval mode changed",
            ".grad changed",
            "parameters changed",
            "global RNG advanced",
            "one HVP with default SDPA kernel",
        ],
        rows,
    )

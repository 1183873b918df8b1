"""A multi-scale sharpness study on CPU: train a ladder of byte-level GPT-2s on the KJV Bible with
the same data order and schedule, measure critical sharpness along each run, then fit scaling
laws and the three-phase model to the measured curves and set them beside the paper's simulator.

    python recipes/scale_study.py                     # 5 sizes, ~8K to ~0.8M parameters
    python recipes/scale_study.py --steps 100 --sizes tiny,small,medium   # a quick look

Writes under --out: one folder per size (sharpness.jsonl, an offline W&B run), report.md with
the fit tables and a verdict line per claim of the paper, and curves.png. A size whose JSONL is
complete is not trained again, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import wandb
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import sharpmeter as sm
from sharpmeter.analysis import compare_fits, curves_from_records, fit_three_phase, tail_mean
from sharpmeter.data import BYTE_VOCAB, lm_dataset
from sharpmeter.integrations.hf import SharpnessCallback
from sharpmeter.records import read_records
from sharpmeter.simulator import simulate_run
from sharpmeter.sinks import wandb_report_to

# (n_embd, n_layer, n_head): about two decades of parameters on a byte vocabulary.
SIZES = {
    "tiny": (16, 1, 2),
    "small": (32, 2, 2),
    "medium": (64, 2, 4),
    "large": (96, 3, 4),
    "xlarge": (128, 4, 4),
}
BLOCK = 64
QUANTITY = "critical_sharpness"
FINAL_FRACTION = 0.2


def build_model(name: str) -> GPT2LMHeadModel:
    n_embd, n_layer, n_head = SIZES[name]
    config = GPT2Config(
        vocab_size=BYTE_VOCAB,
        n_positions=BLOCK,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def train_size(name: str, args: argparse.Namespace, data) -> Path:
    """Train one size with the sharpness callback; skip it if its curve is complete."""
    folder = Path(args.out) / name
    jsonl = folder / "sharpness.jsonl"
    if jsonl.exists() and any(r["step"] == args.steps for r in read_records(jsonl)):
        print(f"{name}: already trained, reusing {jsonl}")
        return jsonl
    os.environ["WANDB_DIR"] = str(folder)
    os.environ.setdefault("WANDB_PROJECT", "sharpmeter-study")
    training = TrainingArguments(
        output_dir=str(folder),
        run_name=name,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.steps // 10,
        logging_steps=max(args.steps // 20, 1),
        save_strategy="no",
        report_to=wandb_report_to(),
        use_cpu=True,
        seed=0,  # identical initialisation seed and data order for every size
        data_seed=0,
    )
    trainer = Trainer(model=build_model(name), args=training, train_dataset=data)
    SharpnessCallback.attach(
        trainer, measures=("critical",), schedule=sm.Schedule(every=args.every), probe_size=16
    )
    trainer.train()
    if wandb.run is not None:
        wandb.finish()
    return jsonl


def analyse(paths: list[Path], out: Path) -> str:
    """Fits and verdicts from the logged JSONL files alone; returns the Markdown report."""
    rows = [row for path in paths for row in read_records(path)]
    curves = curves_from_records(rows, quantity=QUANTITY)
    sizes = np.array(sorted(curves))
    finals = np.array([tail_mean(curves[n][1], FINAL_FRACTION) for n in sizes])
    lines = [
        "# Sharpness scaling study (CPU)",
        "",
        f"Quantity: `{QUANTITY}`; final value = mean "
        f"of the last {FINAL_FRACTION:.0%} of measurements.",
        "",
    ]
    lines += [
        "| size (params) | final | peak | peak/final | three-phase fit (S_p, S_f, t_p, lambda) |",
        "|---:|---:|---:|---:|:---|",
    ]
    phases_found = 0
    for n, final in zip(sizes, finals, strict=True):
        t, s = curves[n]
        try:
            fit = fit_three_phase(t, s)
            described = f"{fit.s_p:.3g}, {fit.s_f:.3g}, {fit.t_p:.3f}, {fit.lam:.3g}"
            phases_found += fit.s_p > fit.s_f > 0 and 0 < fit.t_p < 1
        except (ValueError, RuntimeError) as error:
            described = f"no fit ({error})"
        lines.append(
            f"| {n:,.0f} | {final:.4g} | {np.max(s):.4g} | {np.max(s) / final:.3g} | {described} |"
        )
    lines.append("")
    verdicts = [
        f"- Three phases (rise, decay, plateau) fitted: {phases_found} of {len(sizes)} sizes."
    ]
    if len(sizes) >= 3:
        comparison = compare_fits(sizes, finals)
        ll, pl = comparison.log_linear, comparison.power_law
        lines += [
            "| form | slope / exponent | 95% interval | R^2 | AIC |",
            "|:--|--:|:--|--:|--:|",
            f"| log-linear S = a log10 N + b | {ll.slope:.4g} | "
            f"[{ll.slope_ci[0]:.3g}, {ll.slope_ci[1]:.3g}] | {ll.r2:.4f} | {ll.aic:.2f} |",
            f"| power law S = c N^k | {pl.slope:.4g} | "
            f"[{pl.slope_ci[0]:.3g}, {pl.slope_ci[1]:.3g}] | {pl.r2:.4f} | {pl.aic:.2f} |",
            "",
        ]
        verdicts += [
            f"- Log-linear preferred by AIC: {'yes' if comparison.best == 'log-linear' else 'no'}"
            f" (delta AIC {comparison.delta_aic:.2f}).",
            f"- Sign of the slope: {slope_verdict(ll.slope, ll.slope_ci)}.",
        ]
    lines += [
        "## Verdicts on the paper's claims",
        "",
        *verdicts,
        "",
        "The simulator's curves at the same sizes (shape only, normalised by the final "
        "value) are drawn beside the measured ones in curves.png; the paper's calibration "
        "starts at 10M parameters, so at these sizes its levels are an extrapolation.",
        "",
    ]
    plot_curves(curves, out / "curves.png")
    lines += ["![curves](curves.png)", ""]
    return "\n".join(lines)


def slope_verdict(slope: float, interval: tuple[float, float]) -> str:
    sign = (
        "negative (flatter with scale), as the paper" if slope < 0 else "positive, unlike the paper"
    )
    return sign if interval[1] < 0 or interval[0] > 0 else sign + " (interval includes 0)"


def plot_curves(curves: dict, path: Path) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (measured, simulated) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    for colour, n in zip(colours, sorted(curves), strict=True):
        t, s = curves[n]
        measured.plot(t, s / tail_mean(s, FINAL_FRACTION), color=colour, label=f"{n:,.0f}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # below the paper's calibrated range
            run = simulate_run(n)
        simulated.plot(run.t, run.sharpness / run.final_sharpness, color=colour)
    measured.set(
        title="measured critical sharpness", xlabel="fraction of training", ylabel="S / S_final"
    )
    simulated.set(title="paper's simulator, same sizes", xlabel="fraction of training")
    measured.set_yscale("log")
    measured.legend(title="parameters", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"from {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10, help="measure every n steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="runs/study")
    args = parser.parse_args()
    names = args.sizes.split(",")
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.steps < 10 * args.every:
        parser.error("--steps must allow at least 10 measurements (steps >= 10 * every)")

    data = lm_dataset(block_size=BLOCK)
    paths = [train_size(name, args, data) for name in names]
    out = Path(args.out)
    report = analyse(paths, out)
    (out / "report.md").write_text(report)
    summary = {"sizes": names, "jsonl": [str(p) for p in paths], "report": str(out / "report.md")}
    print(json.dumps(summary, indent=2))
    print(report)


if __name__ == "__main__":
    main()

"""The README's main job: a multi-scale sharpness study on CPU. Trains a ladder of byte-level
GPT-2s on the KJV Bible with the same data order and schedule, measures critical sharpness
along each run, then fits scaling laws and the three-phase model to the measured curves and sets
them beside the paper's simulator (sharpmeter/harness/study.py does the work).

    python recipes/scale_study.py                                   # configs/study_cpu.yaml
    python recipes/scale_study.py --sizes tiny small medium --max_steps 100
    python recipes/scale_study.py configs/study_gpu.yaml            # ~14M-210M, on GPUs

Writes under output_dir: one folder per size (sharpness.jsonl, trainer_state.json, an offline
W&B run), report.md and report.html with the fit tables and a verdict line per claim of the
paper, and the figures. A finished size is not trained again: an interrupted study resumes.
"""

import sys
from pathlib import Path

from sharpmeter.cli import main as sharpmeter

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "study_cpu.yaml"


def main(argv: list[str]) -> int:
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        argv = [str(DEFAULT_CONFIG), *argv]
    return sharpmeter(["study", *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

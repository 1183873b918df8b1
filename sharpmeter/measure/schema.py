"""What a run leaves on disk, named once: the measurement library writes it, the GPT harness
marks its end, the paper side reads it.

This module imports nothing (no torch), so that the paper side, which never imports torch, reads
the same names the meter writes. Keep it so: :mod:`sharpmeter.measure.measures` builds its
table from :data:`MEASURE_COLUMNS`, and ``tests/test_layout.py`` checks the import rules.

>>> MEASURES[0], VALUE_COLUMNS[0]
('critical', 'critical_sharpness')
>>> MEASURE_COLUMNS["spectral"]
('lambda_max', 'lambda_max_residual', 'lambda_max_num_matvecs', 'lambda_max_converged')
"""

from __future__ import annotations

# The rows of one run, one JSON line per measurement, beside ``<stem>.meta.json`` (what
# SharpnessCallback writes into the Trainer's output_dir).
RUN_FILE = "sharpness.jsonl"
# A row file's metadata (run identity, config, versions, planned max_steps): <stem> + META_SUFFIX.
META_SUFFIX = ".meta.json"
# The metadata's record of the run's end: false from its start, true once it ended normally
# (a crash or kill -9 leaves false). Files written before it was recorded lack it.
FINISHED_KEY = "finished"
# Written into the run folder by the GPT harness once training has ended: the run is finished.
DONE_FILE = "sharpmeter_run.json"
# Written beside it first when the run held blocks out of training: their loss at the end,
# ``{"loss": mean loss per token, "blocks": count, "tokens": count}`` (generalization).
HELDOUT_FILE = "heldout.json"
# The ``status`` of a row (and of each of its measures) whose probe loss was not finite.
NONFINITE = "nonfinite"
# The status of a measure its schedule did not call for at a row's step (its values NaN).
NOT_DUE = "not_due"


def _eigen_columns(prefix: str) -> tuple[str, ...]:
    return (prefix, f"{prefix}_residual", f"{prefix}_num_matvecs", f"{prefix}_converged")


# Each measure's row columns, its value first, in the order the meter takes the measures.
MEASURE_COLUMNS: dict[str, tuple[str, ...]] = {
    "critical": (
        "critical_sharpness",
        "critical_eta",
        "critical_eta_lo",
        "critical_eta_hi",
        "critical_num_forward",
        "stability_ratio",
    ),
    "directional": ("directional_sharpness",),
    "trace": ("hessian_trace", "hessian_trace_stderr", "hessian_trace_num_matvecs"),
    "spectral": _eigen_columns("lambda_max"),
    "preconditioned": _eigen_columns("preconditioned_lambda_max"),
}
MEASURES = tuple(MEASURE_COLUMNS)
VALUE_COLUMNS = tuple(columns[0] for columns in MEASURE_COLUMNS.values())
# The measure whose ``<measure>_status`` says whether a column's value may be used.
MEASURE_OF_COLUMN = {
    column: measure for measure, cols in MEASURE_COLUMNS.items() for column in cols
}
# The one status of a measure whose values are results (every other keeps them only as evidence).
OK = "ok"

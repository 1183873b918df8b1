"""Where measurement rows go: a JSONL file always, W&B when a run is active or wanted.

Every row of the JSONL file carries the run's identity (``run``, ``n_params``) so that files of
several runs can be analysed together (``sharpmeter fit runs/*/sharpness.jsonl``); the full
metadata (config, seed, dtype, library versions) goes once into ``<name>.meta.json`` beside it.

W&B never prompts: with no API key (``WANDB_API_KEY`` or a stored login) and no ``WANDB_MODE``,
a run is started in offline mode; ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCALAR_TYPES = (int, float, bool)


def run_metadata(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Identity of a run: parameter count, dtype, model config, versions, plus ``extra``."""
    import sharpmeter

    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    first = next(model.parameters(), None)
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "model_class": type(model).__name__,
        "config": to_dict() if callable(to_dict) else None,
        "versions": {
            "sharpmeter": sharpmeter.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            **_optional_versions("transformers", "accelerate", "wandb"),
        },
        **extra,
    }


def _optional_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


class JsonlSink:
    """Appends one JSON line per measurement, flushed at once (a crash loses nothing).

    Args:
        path: the ``.jsonl`` file; parent folders are created.
        metadata: written to ``<path stem>.meta.json``; its ``run`` and ``n_params`` are also
            put in every row.
        resume_step: when resuming from a checkpoint at this step, rows measured after it
            (by the run that crashed or was stopped) are dropped first, so the curve continues
            without duplicates.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        metadata = dict(metadata or {})
        self.identity = {k: metadata[k] for k in ("run", "n_params") if k in metadata}
        if metadata:
            meta_path = self.path.with_name(self.path.stem + ".meta.json")
            meta_path.write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.write_text("")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({**self.identity, **_json_safe(row)}) + "\n")
            handle.flush()


def _json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """NaN and infinities become ``null`` (strict JSON); tensors become Python numbers."""
    safe = {}
    for key, value in row.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        safe[key] = value
    return safe


def numeric_items(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The scalar entries of a row (no statuses), keys prefixed: what metric loggers accept."""
    return {
        f"{prefix}{key}": float(value)
        for key, value in row.items()
        if isinstance(value, SCALAR_TYPES) and key != "step"
    }


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; else ``online`` with credentials, ``offline`` without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    return "online" if has_key else "offline"


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


class WandbSink:
    """Logs rows into the active W&B run, or starts one (offline without credentials).

    Args:
        project: W&B project of a run this sink starts.
        prefix: key prefix, ``sharpness/`` by default.
        step_key: the x-axis metric; the rows' ``step`` is logged under it.
        init_kwargs: more ``wandb.init`` arguments (``name``, ``config``, ``dir``, ...).
    """

    def __init__(
        self,
        project: str = "sharpmeter",
        prefix: str = "sharpness/",
        step_key: str = "train/global_step",
        **init_kwargs: Any,
    ) -> None:
        import wandb

        self.wandb = wandb
        self.prefix = prefix
        self.step_key = step_key
        self.owns_run = wandb.run is None
        if self.owns_run:
            self.run = wandb.init(project=project, mode=wandb_mode(), **init_kwargs)
        else:
            self.run = wandb.run
        self.run.define_metric(step_key)
        self.run.define_metric(f"{prefix}*", step_metric=step_key)

    def write(self, row: Mapping[str, Any]) -> None:
        self.run.log({**numeric_items(row, self.prefix), self.step_key: row["step"]})

    def close(self) -> None:
        if self.owns_run:
            self.run.finish()


def wandb_report_to() -> list[str]:
    """``report_to`` for a Trainer: ``["wandb"]`` when wandb is installed, with ``WANDB_MODE``
    set to :func:`wandb_mode` unless the user set it (so a machine without credentials runs
    offline instead of prompting), else ``[]``."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return []
    os.environ.setdefault("WANDB_MODE", wandb_mode())
    return ["wandb"]

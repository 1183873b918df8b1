"""Where measurement rows go: a JSONL file always, W&B when a run is active or wanted.

Every row of the JSONL file carries the run's identity (``run``, ``n_params``) so that files of
several runs can be analysed together (``sharpmeter fit runs/*/sharpness.jsonl``); the full
metadata (config, seed, dtype, library versions) goes once into ``<name>.meta.json`` beside it.

W&B never prompts: with no API key that wandb would use (``WANDB_API_KEY``, ``wandb login``) and
no ``WANDB_MODE``, a run is started in offline mode, and so is one that cannot start online;
``wandb sync`` uploads it later.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import platform
import warnings
import weakref
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from sharpmeter.measure.files import (
    CANNOT_LOCK,
    atomic_write_text,
    close_locked,
    open_locked,
    write_all,
)
from sharpmeter.measure.schema import FINISHED_KEY, MEASURE_COLUMNS, META_SUFFIX, NOT_DUE

SCALAR_TYPES = (int, float, bool)


def run_metadata(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Identity of a run: parameter count, dtype, model config, versions, plus ``extra``."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    first = next(model.parameters(), None)
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "model_class": type(model).__name__,
        "config": to_dict() if callable(to_dict) else None,
        "versions": {
            "sharpmeter": _sharpmeter_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            **_optional_versions("transformers", "accelerate", "wandb"),
        },
        **extra,
    }


def _sharpmeter_version() -> str:
    """The installed distribution's version (a source tree run without installing has none)."""
    try:
        return version("sharpmeter")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _optional_versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@runtime_checkable
class Sink(Protocol):
    """Where rows go: :class:`JsonlSink`, :class:`WandbSink`, or anything with these two.

    ``write`` takes one meter row (its ``step`` included); ``close`` ends the sink's own
    resources (never a W&B run it did not start)."""

    def write(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class SinkWarning(RuntimeWarning):
    """A sink could not write (or writes again): training goes on, rows wait in memory."""


class JsonlLockedError(RuntimeError):
    """Another live writer (another process, or another sink of this one) holds the JSONL file:
    two writers would interleave their rows into one curve."""


class LoggingFailures:
    """Sends rows to loggers (W&B, the Trainer's ``report_to``) so that a logger that raises
    (a service down, a full disk, a run that cannot be set up) never stops training: a
    :class:`SinkWarning` when logging starts failing and one when it works again, once each;
    the JSONL file keeps every row meanwhile.

    Args:
        where: what the warnings name beside the row, e.g. ``" to W&B"``.
    """

    def __init__(self, where: str = "") -> None:
        self.where = where
        self.failing = False

    def send(self, step: int, send: Callable[[], None]) -> None:
        """Call ``send`` for the row of ``step``; never raises."""
        try:
            send()
        except Exception as error:
            if not self.failing:
                warnings.warn(
                    f"logging the sharpness row of step {step}{self.where} failed "
                    f"({type(error).__name__}: {error}); training goes on, the JSONL file keeps "
                    "the rows, and later failures are not reported until logging works again",
                    SinkWarning,
                    stacklevel=4,
                )
            self.failing = True
            return
        if self.failing:
            warnings.warn(
                f"logging sharpness rows{self.where} works again (step {step})",
                SinkWarning,
                stacklevel=4,
            )
        self.failing = False


class JsonlSink:
    """Appends one JSON line per measurement, flushed at once (a crash loses nothing).

    The file is this sink's alone while it lives: it holds the file's exclusive ``flock`` from
    its first write (at construction) to :meth:`close` (or its collection), and a second sink
    on the same file, in this process or another, raises :class:`JsonlLockedError` when it is
    made. The kernel drops the lock when its holder dies (``kill -9`` included). A file an
    earlier run left (rows, or only its ``.meta.json``) is never truncated: it is moved aside
    to the first free ``<stem>.<n>.jsonl`` with its metadata (``sharpness.1.jsonl``,
    ``sharpness.1.meta.json``), with a :class:`RuntimeWarning` naming both, so that the new
    run starts a file of its own and no earlier metadata describes it. Resuming
    (``resume_step``) keeps the earlier rows instead, unless they come from another file
    (``resume_rows_from``): what ``path`` holds then is another run's, moved aside likewise.
    On a filesystem that cannot lock, the sink warns and writes unlocked.

    A failing write (read-only folder, full disk) never stops training: the rows that could not
    be written wait in :attr:`pending` and every later :meth:`write` (or :meth:`flush`) writes
    them first, so once the disk is back the file holds every row, in order, exactly once. A
    :class:`SinkWarning` says when writing fails and when it works again, once each.

    The metadata records how the run ended: ``"finished": false`` from the start, ``true`` once
    the writer calls :meth:`mark_finished` at its normal end; a run that crashed or was killed
    keeps ``false``, so analysis never has to guess from the steps logged. Rows still pending
    when the sink is closed, or garbage-collected without :meth:`close` (training raised), or
    when the interpreter exits, are reported lost with a :class:`SinkWarning`.

    Args:
        path: the ``.jsonl`` file; parent folders are created.
        metadata: written to ``<path stem>.meta.json`` with ``finished`` added; its ``run``
            and ``n_params`` are also put in every row.
        resume_step: when resuming from a checkpoint at this step, rows measured after it
            (by the run that crashed or was stopped) are dropped first, so the curve continues
            without duplicates; so is a torn last line the crash left.
        resume_rows_from: with ``resume_step``, the JSONL of the run the checkpoint comes from
            when it is another file (a checkpoint in another folder): that file's rows up to
            ``resume_step`` start this one, their ``run`` and ``n_params`` made this sink's
            (analysis reads one training as one run), and what ``path`` held is moved aside.
            A file that cannot be read (missing, no permission) gives no rows.

    Raises:
        JsonlLockedError: another live writer holds ``path``.

    Attributes:
        resumed_rows: with ``resume_step``, how many rows of the run before the resume start
            the file (kept, or copied from ``resume_rows_from``); None otherwise, or while the
            file cannot be written.
        resumed_rows_from: the file those rows were read from (``path`` or
            ``resume_rows_from``); None when there were none.
        resume_source_error: why ``resume_rows_from`` could not be read; None when it was
            (or was not given).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        resume_rows_from: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(path)
        metadata = dict(metadata or {})
        self.identity = {k: metadata[k] for k in ("run", "n_params") if k in metadata}
        self.meta_path = self.path.with_name(self.path.stem + META_SUFFIX)
        self._metadata = {**metadata, FINISHED_KEY: False} if metadata else {}
        # What is still to be written; each is retried until it succeeds.
        self._meta_text = _metadata_text(self._metadata) if metadata else None
        self._resume_step = resume_step
        self._resume_rows_from = None if resume_rows_from is None else Path(resume_rows_from)
        self.resumed_rows: int | None = None
        self.resumed_rows_from: Path | None = None
        self.resume_source_error: OSError | None = None
        self._prepared = False
        self.pending: list[str] = []
        # Reports the rows still pending when the sink is closed, collected or left at exit;
        # the list is shared (only ever changed in place), the sink itself is not held.
        self._report_lost = weakref.finalize(self, _report_lost_rows, self.pending, self.path)
        # Closes the descriptor holding the file's lock (at close, collection or exit).
        self._unlock: Callable[[], object] = _nothing
        # File size before a failed append whose torn part could not be cut off yet.
        self._torn_at: int | None = None
        self._failing = False
        self._retry()

    def write(self, row: Mapping[str, Any]) -> None:
        # Encoded now, so that a row JSON cannot hold raises here instead of blocking the queue.
        self.pending.append(json.dumps({**self.identity, **_json_safe(row)}) + "\n")
        self._retry()

    def flush(self) -> None:
        """Tries again to write what is pending (rows, metadata) without adding a row."""
        self._retry()

    def mark_finished(self) -> None:
        """Records in the metadata that the run ended normally (``"finished": true``): the file
        is rewritten whole, retried like the rows; never raises (a sink without metadata has
        nothing to mark)."""
        if not self._metadata:
            return
        self._metadata[FINISHED_KEY] = True
        self._meta_text = _metadata_text(self._metadata)
        self._retry()

    def close(self) -> None:
        """Makes a last try; what still cannot be written is reported lost and dropped. The
        file's lock is released."""
        self._retry()
        self._report_lost()
        self._unlock()
        if self._meta_text is not None:
            warnings.warn(
                f"sharpmeter: the run metadata could not be written to {self.meta_path}",
                SinkWarning,
                stacklevel=2,
            )
            self._meta_text = None

    def _retry(self) -> None:
        """One attempt at everything outstanding; warns when a failure starts and ends (not per
        row, so that a long outage does not flood the log)."""
        failed: tuple[Path, OSError] | None = None
        written = 0
        try:
            self._prepare()
        except OSError as error:
            failed = (self.path, error)
        else:
            written, error = self._append_pending()
            if error is not None:
                failed = (self.path, error)
            if self._meta_text is not None:
                try:
                    atomic_write_text(self.meta_path, self._meta_text)
                    self._meta_text = None
                except OSError as error:
                    failed = failed or (self.meta_path, error)
        if failed is not None and not self._failing:
            self._failing = True
            path, error = failed
            warnings.warn(
                f"sharpmeter could not write {path} ({error}); training goes on, the rows are "
                "kept in memory and written at the next try",
                SinkWarning,
                stacklevel=3,
            )
        elif failed is None and self._failing:
            self._failing = False
            warnings.warn(
                f"sharpmeter writes {self.path} again: {written} pending rows written",
                SinkWarning,
                stacklevel=3,
            )

    def _prepare(self) -> None:
        """Makes the folder, takes the file and sets it up for this run (an earlier run moved
        aside, or the resumed run's rows kept), before any row of this run is added."""
        if self._prepared:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._hold_file()
        if self._resume_step is None or self._resumes_another_file():
            # Resuming another file's run: what is here is not that run's (an unrelated run's,
            # or an earlier try of this resume), so it must neither head the curve nor be cut.
            self._move_earlier_run_aside()
        if self._resume_step is not None:
            self._keep_rows_up_to(self._resume_step)
        self._prepared = True

    def _resumes_another_file(self) -> bool:
        source = self._resume_rows_from
        return source is not None and source.resolve() != self.path.resolve()

    def _hold_file(self) -> None:
        """Takes the lock of the file ``path`` names now, for the sink's life; a lock held on
        the file it named before (moved aside, replaced) is released.

        Raises:
            JsonlLockedError: another live writer holds it.
        """
        self._unlock()
        try:
            descriptor = _open_locked_unless_held(self.path)
        except OSError as error:
            if error.errno not in CANNOT_LOCK:
                raise
            warnings.warn(
                f"sharpmeter: {self.path} cannot be locked ({error.strerror}); writing it "
                "unlocked: a second writer there would mix its rows into this run's",
                RuntimeWarning,
                stacklevel=5,
            )
            return
        self._unlock = weakref.finalize(self, close_locked, descriptor)

    def _move_earlier_run_aside(self) -> None:
        """Renames what an earlier run left at ``path`` (rows, metadata) to the first free
        ``<stem>.<n>``: its writer is gone (the lock was free), its file stays readable."""
        moved = []
        rows_aside, meta_aside = _free_names_aside(self.path, self.meta_path)
        if self.path.stat().st_size > 0:
            os.replace(self.path, rows_aside)
            moved.append((self.path, rows_aside))
            self._hold_file()  # the lock went with the earlier run's file
        if self.meta_path.exists():
            os.replace(self.meta_path, meta_aside)
            moved.append((self.meta_path, meta_aside))
        if moved:
            renames = ", ".join(f"{source} -> {target.name}" for source, target in moved)
            warnings.warn(
                f"sharpmeter: an earlier run's files were moved aside so that this run starts "
                f"its own: {renames}",
                RuntimeWarning,
                stacklevel=5,
            )

    def _keep_rows_up_to(self, step: int) -> None:
        """Keeps the rows up to ``step`` (the resumed run's), or starts the file with those of
        :attr:`_resume_rows_from` when it is another file."""
        data = _read_or_empty(self.path)
        if self._resumes_another_file():
            source = self._resume_rows_from
            kept = [self._restamped(line) for line in _lines_up_to(self._read_source(), step)]
        else:
            kept, source = _lines_up_to(data, step), self.path
        joined = b"".join(line + b"\n" for line in kept)
        if data.startswith(joined):
            # Only the tail goes: nothing to write, so a full disk or read-only folder cannot
            # stop it, and the kept rows are never rewritten.
            if len(joined) < len(data):
                os.truncate(self.path, len(joined))
        else:
            atomic_write_text(self.path, joined.decode("utf-8"))
            self._hold_file()  # the lock stayed with the file replaced
        self.resumed_rows = len(kept)
        self.resumed_rows_from = source if kept else None

    def _read_source(self) -> bytes:
        """The rows of :attr:`_resume_rows_from`, or none when it cannot be read: another
        run's file (gone, another user's) must not keep this run from writing its own."""
        try:
            data = self._resume_rows_from.read_bytes()
        except OSError as error:
            self.resume_source_error = error
            return b""
        self.resume_source_error = None
        return data

    def _restamped(self, line: bytes) -> bytes:
        """A row of the run resumed, under this run's identity."""
        return json.dumps({**json.loads(line), **self.identity}).encode("utf-8")

    def _append_pending(self) -> tuple[int, OSError | None]:
        """Appends the pending rows in order, each in one write, until one fails; a failed append
        is cut off again, so that the next line is never glued onto a torn one."""
        if not self.pending:
            return 0, None
        written = 0
        try:
            with open(self.path, "ab", buffering=0) as handle:
                if self._torn_at is not None:
                    if handle.seek(0, os.SEEK_END) > self._torn_at:
                        handle.truncate(self._torn_at)
                    self._torn_at = None
                while self.pending:
                    start = handle.seek(0, os.SEEK_END)
                    try:
                        write_all(handle, self.pending[0].encode("utf-8"))
                    except OSError:
                        self._torn_at = start
                        with contextlib.suppress(OSError):
                            handle.truncate(start)
                            self._torn_at = None
                        raise
                    self.pending.pop(0)
                    written += 1
        except OSError as error:
            return written, error
        return written, None


def _metadata_text(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, indent=2, default=str) + "\n"


def _report_lost_rows(pending: list[str], path: Path) -> None:
    """The rows that could not be written are dropped, with a warning saying so."""
    if pending:
        warnings.warn(
            f"sharpmeter: {len(pending)} rows could not be written to {path} and are lost",
            SinkWarning,
            stacklevel=2,
        )
        pending.clear()


def _nothing() -> None:
    """What releases a lock the sink does not hold."""


def _open_locked_unless_held(path: Path) -> int:
    """:func:`~sharpmeter.measure.files.open_locked`, once more after a garbage collection: a
    sink of this process that nothing references any more (a crashed run's, in a notebook)
    still holds the lock until it is collected.

    Raises:
        JsonlLockedError: a live writer holds it.
    """
    try:
        return open_locked(path)
    except BlockingIOError:
        gc.collect()
    try:
        return open_locked(path)
    except BlockingIOError:
        raise JsonlLockedError(
            f"{path} is being written by another live sharpmeter writer (another process, or "
            "another meter or callback of this one): two writers would mix their rows into "
            "one curve; pass a different output_dir (or jsonl_path), or close the other "
            "writer first"
        ) from None


def _free_names_aside(path: Path, meta_path: Path) -> tuple[Path, Path]:
    """The first ``<stem>.<n>.jsonl`` and ``<stem>.<n>.meta.json`` beside ``path`` that are
    both free."""

    def aside(n: int) -> tuple[Path, Path]:
        return path.with_name(f"{path.stem}.{n}{path.suffix}"), meta_path.with_name(
            f"{path.stem}.{n}{META_SUFFIX}"
        )

    free = next(n for n in itertools.count(1) if not any(p.exists() for p in aside(n)))
    return aside(free)


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _lines_up_to(data: bytes, step: int) -> list[bytes]:
    """The whole JSON rows of ``data`` whose step is at most ``step``, in order."""
    return [line for line in data.splitlines() if _step_at_most(line, step)]


def _step_at_most(line: bytes, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:  # a line torn by a crash, or an empty one
        return False
    if not isinstance(row, dict):
        return False
    row_step = row.get("step", -1)
    return isinstance(row_step, (int, float)) and row_step <= step


def _json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as strict JSON takes it (:func:`_json_value` of each value)."""
    return {key: _json_value(value) for key, value in row.items()}


def _json_value(value: Any) -> Any:
    """NaN and infinities become ``null`` (strict JSON), at any depth; tensors and numpy
    scalars (anything with ``.item()`` and no length) become Python numbers; lists, tuples
    and dicts are converted inside."""
    if isinstance(value, Mapping):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, torch.Tensor) or _is_numpy_scalar(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_numpy_scalar(value: Any) -> bool:
    """A numpy scalar (``np.float32(1.5)``), told without importing numpy."""
    return (
        type(value).__module__ == "numpy"
        and callable(getattr(value, "item", None))
        and (getattr(value, "ndim", None) == 0)
    )


def numeric_items(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The scalar entries of a row (no statuses), keys prefixed: what metric loggers accept.
    The columns of a measure its schedule did not call for at this step are left out: a logger
    would plot their NaN as a point that was measured and failed.

    >>> numeric_items({"step": 5, "loss": 2.0, "hessian_trace": None, "trace_status": "ok"})
    {'loss': 2.0}
    >>> row = {"step": 5, "loss": 2.0, "hessian_trace_stderr": float("nan")}
    >>> numeric_items({**row, "trace_status": "not_due"}, prefix="s/")
    {'s/loss': 2.0}
    """
    not_due = {
        column
        for measure, columns in MEASURE_COLUMNS.items()
        if row.get(f"{measure}_status") == NOT_DUE
        for column in columns
    }
    return {
        f"{prefix}{key}": float(value)
        for key, value in row.items()
        if isinstance(value, SCALAR_TYPES) and key != "step" and key not in not_due
    }


# How long a run the sink starts waits for the W&B server before it starts offline instead:
# wandb's own 90 s would hold training that long where a key is set but the network is down.
INIT_TIMEOUT_S = 30


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; else ``online`` when wandb has an API key for the server it would
    sync to, ``offline`` without one (so that no run ever stops to prompt for a key)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _wandb_has_key() else "offline"


def _wandb_has_key() -> bool:
    """Whether wandb would find credentials for the server it would sync to (its base URL, from
    its settings files and ``WANDB_BASE_URL``), where ``wandb.init`` looks: this session's
    ``wandb.login``, ``WANDB_API_KEY`` or an identity token file, that server's entry in the
    netrc file (``$NETRC`` or ``~/.netrc``), a key in its settings. Asked of wandb itself, so
    that an entry for another host or another server counts for nothing. Never prompts nor
    connects; any failure (a wandb whose internals moved) means no key, and offline loses
    nothing."""
    try:
        from wandb import env
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings_if_loaded or _fresh_wandb_settings()
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        return bool(
            wbauth.session_credentials(host=host)
            or os.environ.get(env.API_KEY)
            or os.environ.get(env.IDENTITY_TOKEN_FILE)
            or wbauth.read_netrc_auth(host=host)
            or settings.api_key
        )
    except Exception:
        return False


def _fresh_wandb_settings() -> Any:
    """The settings a wandb session started now would load (settings files, then ``WANDB_*``),
    read without starting one: wandb reads the environment once per process, so loading its
    session here would make it ignore a ``WANDB_MODE`` set afterwards."""
    import wandb

    settings = wandb.Settings()
    config_dir = os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")
    settings.settings_system = str(Path(config_dir, "settings").expanduser())
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings


def start_wandb_run(**init_kwargs: Any) -> Any:
    """``wandb.init(**init_kwargs)`` that never prompts and never stops training: in
    :func:`wandb_mode` unless ``mode`` is given, waiting at most :data:`INIT_TIMEOUT_S` for the
    server (unless ``settings`` or ``WANDB_INIT_TIMEOUT`` say otherwise). A run that cannot
    start online (no network, a key the server refuses) starts offline, with a
    :class:`SinkWarning`: ``wandb sync`` uploads it later, so nothing is lost."""
    import wandb

    init_kwargs.setdefault("mode", wandb_mode())
    if not os.environ.get("WANDB_INIT_TIMEOUT"):
        init_kwargs.setdefault("settings", wandb.Settings(init_timeout=INIT_TIMEOUT_S))
    try:
        return wandb.init(**init_kwargs)
    except Exception as error:
        if init_kwargs["mode"] != "online":
            raise
        warnings.warn(
            f"the W&B run could not start online ({type(error).__name__}: {error}); it is "
            "written offline instead (upload it with `wandb sync`)",
            SinkWarning,
            stacklevel=2,
        )
        return wandb.init(**{**init_kwargs, "mode": "offline"})


class WandbSink:
    """Logs rows into the active W&B run, or into one it starts when none is active (offline
    without an API key, see :func:`start_wandb_run`).

    A run the sink did not start is the user's (or the Trainer's), and costs it nothing:

    * the sink follows whichever run is active at each row (defining its metrics again in a new
      one); with none active the row is skipped (the JSONL file has it);
    * a row joins the step the run is at (``commit=False``), so a user who logs with
      ``step=`` can still log at that step after the row. The run's next log or its end commits
      the row. When the run has not moved on since the sink's previous row, that one is
      committed first, so that no row overwrites another: the run's step then advances by one.
      W&B keeps one step per run, so a user whose explicit steps move less often than the rows
      (``step=epoch``) has the logs that fall behind dropped by W&B: log with the global step,
      or without ``step=``;
    * the rows' x-axis is the sink's own key (``<prefix>step``), which the user's next log at
      that step cannot overwrite (the Trainer's ``train/global_step`` would), and each key is
      defined on it by name: a glob of the user's (the Trainer's ``*``) would match it too.

    Args:
        project: W&B project of a run this sink starts.
        prefix: key prefix, ``sharpness/`` by default.
        step_key: the x-axis metric, ``<prefix>step`` by default; the rows' ``step`` goes there.
        init_kwargs: more ``wandb.init`` arguments (``name``, ``config``, ``dir``, ``mode``,
            ...).
    """

    def __init__(
        self,
        project: str = "sharpmeter",
        prefix: str = "sharpness/",
        step_key: str | None = None,
        **init_kwargs: Any,
    ) -> None:
        import wandb

        self.wandb = wandb
        self.prefix = prefix
        self.step_key = step_key or f"{prefix}step"
        self.owns_run = wandb.run is None
        self.run = start_wandb_run(project=project, **init_kwargs) if self.owns_run else wandb.run
        self._defined: set[str] = set()
        self._uncommitted_at: int | None = None  # the W&B step holding our uncommitted row

    def write(self, row: Mapping[str, Any]) -> None:
        data = {**numeric_items(row, self.prefix), self.step_key: row["step"]}
        if self.owns_run:
            self._define(data)
            self.run.log(data)
        elif self._follow_active_run():
            self._define(data)
            self._join_current_step(data)

    def _follow_active_run(self) -> bool:
        """The user may finish their run, or start another, mid-training: the row goes to the
        run active now; False when there is none."""
        active = self.wandb.run
        if active is None:
            return False
        if active is not self.run:
            self.run, self._defined, self._uncommitted_at = active, set(), None
        return True

    def _define(self, data: Mapping[str, Any]) -> None:
        """Puts each new key on the sink's x-axis, by name: a name wins over any glob, and of
        two globs that match (ours and the Trainer's ``*``) W&B may pick either."""
        if self.step_key not in self._defined:
            self.run.define_metric(self.step_key)
            self._defined.add(self.step_key)
        for key in data.keys() - self._defined:
            self.run.define_metric(key, step_metric=self.step_key)
            self._defined.add(key)

    def _join_current_step(self, data: Mapping[str, Any]) -> None:
        """Adds the row to the step the run is at, uncommitted; when that step still holds the
        sink's previous row (the run has not moved on), that one is committed first, or the
        new row would overwrite it."""
        step = self.run.step
        if step == self._uncommitted_at:
            self.run.log({}, commit=True)
            step += 1
        self.run.log(data, commit=False)
        self._uncommitted_at = step

    def close(self) -> None:
        """Finishes a run the sink started; a run of the user's is left to them (its end
        commits the last row)."""
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

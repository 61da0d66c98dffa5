"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG) + data iterator state.

Layout: <output_dir>/checkpoints/<step>/{state, data, meta}. Saves are asynchronous (the step
loop continues while arrays are written); at most `keep` checkpoints are kept. Restoring reads
every array straight into the sharding the run uses now (so a run may resume on another mesh).

Damaged checkpoints (a lost `state/_METADATA` or `state/manifest.ocdbt`, a truncated data file,
garbled JSON) are skipped on resume: `restore_newest` tries the newest first and moves each one
that fails to <output_dir>/checkpoints.damaged/<step> (never deleted), with the error and
everything tensorstore printed in <step>.txt beside it. Moving it aside lets the resumed run save
that step again. Bytes flipped inside array data are not detected: OCDBT stores no checksums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import io
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp

from jaxprefill.config import ConfigError
from jaxprefill.train.config import config_diff


class CheckpointError(ConfigError):
    """No checkpoint of a run's output_dir restores; the message names the directory and what to
    do. A ConfigError: the run as configured cannot continue, and the command line reports it in
    one line."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any          # the train state, on the target shardings
    data_state: dict    # the data iterator's `get_state()`
    meta: dict          # {"model": ModelConfig dict, "config": TrainConfig dict}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.damaged_directory = self.directory + ".damaged"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = True) -> bool:
        """Start saving; returns at once when async. `force` saves regardless of intervals."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data iterator state, meta). `abstract_state` leaves are ShapeDtypeStructs with
        the target shardings."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"], out["meta"]

    def restore_newest(self, abstract_state: Any, *, model_config: dict,
                       warn: Callable[[str], None]) -> Restored | None:
        """The newest checkpoint that restores, or None when there is none at all.

        Each one that fails is moved aside and named in one `warn` line. Raises `ConfigError` when
        a checkpoint fails and its saved model config differs from `model_config` (a changed
        recipe, not damage: nothing is moved), and `CheckpointError` when none restores.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if steps:
            _divert_stray_restore_errors()  # before the first attempt: they come within ms
        failed: list[int] = []
        for i, step in enumerate(steps):
            restored, failure = self._attempt(step, abstract_state)
            if failure is None:
                return restored
            if failure.not_damage:  # an older checkpoint would fail the same way
                raise CheckpointError(f"checkpoint step {step} in {self.directory} could not be "
                                      f"read ({failure.message}); nothing was moved")
            self._refuse_changed_config(step, model_config, failure.message)
            reason = self._missing_files(step) or failure.message
            moved = self._set_aside(step, failure.details)
            nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
            warn(f"warning: checkpoint step {step} in {self.directory} is damaged ({reason}); "
                 f"moved to {moved} (details in {moved}.txt); {nxt}")
            failed.append(step)
        if not failed:
            return None
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores (steps {failed} are damaged and were "
            f"moved to {self.damaged_directory}); to start from scratch, rerun as is, or use "
            f"another output_dir")

    def _attempt(self, step: int, abstract_state: Any) -> tuple[Restored | None, _Failure | None]:
        """Restore `step` with everything orbax and tensorstore print captured."""
        with captured_output() as captured:
            try:
                state, data_state, meta = self.restore(step, abstract_state)
                failure = None
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                failure = _Failure(_first_line(e), _not_damage(e), traceback.format_exc())
            if failure is not None:
                # The failed restore leaves coroutines in reference cycles; finalized at some
                # later garbage collection, each would print a long traceback in mid-training.
                gc.collect()
        if failure is None:
            if captured.text:  # a restore that worked keeps whatever it printed
                sys.stderr.write(captured.text)
            return Restored(step, state, data_state, meta), None
        failure.details += f"\n---- output during the restore ----\n{captured.text}"
        return None, failure

    def _refuse_changed_config(self, step: int, model_config: dict, message: str) -> None:
        with captured_output():
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception:  # the meta item is damaged too: treat the checkpoint as damaged
                gc.collect()  # as in _attempt
                return
        diff = config_diff(meta.get("model"), model_config)
        if diff:
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} was saved with another model config "
                f"({'; '.join(diff[:5])}) and does not restore into this run's model "
                f"({message}); resume with the saved config or use another output_dir")

    def _missing_files(self, step: int) -> str | None:
        """"missing a, b" for the standard files of a checkpoint that are not there, else None."""
        path = os.path.join(self.directory, str(step))
        missing = [f for f in ("state/_METADATA", "state/manifest.ocdbt", "data/metadata", "meta/metadata")
                   if not os.path.exists(os.path.join(path, f))]
        return f"missing {', '.join(missing)}" if missing else None

    def _set_aside(self, step: int, details: str) -> str:
        """Move checkpoint `step` to the damaged directory (process 0; all hosts wait)."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.damaged_directory, str(step))
        n = 1
        while os.path.exists(dst):  # the same step damaged again in a later run
            dst = os.path.join(self.damaged_directory, f"{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.makedirs(self.damaged_directory, exist_ok=True)
            shutil.move(src, dst)
            with open(dst + ".txt", "w") as f:
                f.write(details)
            _stray_log.append(dst + ".txt")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxprefill checkpoint {step} set aside")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@dataclasses.dataclass
class _Failure:
    message: str        # the innermost cause's first line
    not_damage: bool    # a failure that says nothing about the files (see _not_damage)
    details: str        # the traceback, then everything printed during the attempt


def _innermost(error: BaseException) -> BaseException:
    for _ in range(32):  # exception chains are short; the bound only guards against a cycle
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of the innermost cause (tensorstore's own message is the telling one)."""
    error = _innermost(error)
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Failures that say nothing about the checkpoint's files (no permission, out of memory, storage
# unavailable): moving the checkpoint aside would lose progress for nothing.
_NOT_DAMAGE_CODES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def _not_damage(error: BaseException) -> bool:
    inner = _innermost(error)
    return (isinstance(error, (MemoryError, PermissionError)) or isinstance(inner, (MemoryError, PermissionError))
            or str(inner).lstrip().startswith(_NOT_DAMAGE_CODES))


# Where `_divert_stray_restore_errors` appends what it diverts: the newest damaged checkpoint's
# .txt file (set by `Checkpointer._set_aside`), or nowhere before the first one.
_stray_log: list[str] = []


def _divert_stray_restore_errors() -> None:
    """Keep a failed restore's stragglers off the console for the rest of the process
    (installed once, in front of the current `sys.unraisablehook`).

    When a restore fails, orbax closes its asyncio loop while tensorstore reads are still in
    flight. As each finishes, its callback finds the loop closed (`RuntimeError: Event loop is
    closed`), and its abandoned coroutine, once garbage collected, raises from its error handler;
    Python reports each as an unraisable exception with a long traceback, milliseconds or many
    steps later. Exactly those two kinds are appended to the damaged checkpoint's .txt file;
    everything else still reaches the previous hook.
    """
    if getattr(sys.unraisablehook, "_jaxprefill_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _log_if_stray(unraisable):
            previous(unraisable)

    hook._jaxprefill_filter = True
    sys.unraisablehook = hook
    # The same abandoned orbax tasks (and their futures) also reach asyncio's exception handler,
    # which logs "Task / Future exception was never retrieved" when one is collected.
    logging.getLogger("asyncio").addFilter(_StrayTaskErrors())


class _StrayTaskErrors(logging.Filter):
    """Diverts asyncio's reports of a failed restore's abandoned orbax tasks to the stray log."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" not in text:
            return True
        # A Task's repr names its orbax coroutine; a bare Future's does not, but its exception
        # is tensorstore's read error (or its traceback runs through orbax).
        trace = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        if not any(mark in text + trace for mark in (f"{os.sep}orbax{os.sep}", "OCDBT",
                                                     "tensorstore")):
            return True
        if _stray_log:
            try:
                with open(_stray_log[-1], "a") as f:
                    f.write("\n---- after the restore ----\n" + text + "\n")
                    if record.exc_info:
                        f.write("".join(traceback.format_exception(*record.exc_info)))
            except OSError:  # a diagnostics file that cannot be written loses nothing else
                pass
        return False


def _log_if_stray(unraisable) -> bool:
    """Append `unraisable` to the stray log if it is one of a failed restore's (see above)."""
    exc, obj = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    orbax_coroutine = inspect.iscoroutine(obj) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename
    if not (closed_loop or orbax_coroutine):
        return False
    if _stray_log:
        try:
            with open(_stray_log[-1], "a") as f:
                f.write("\n---- after the restore ----\n")
                f.write("".join(traceback.format_exception(type(exc), exc, unraisable.exc_traceback)))
        except OSError:  # a diagnostics file that cannot be written loses nothing else
            pass
    return True


@dataclasses.dataclass
class Captured:
    text: str = ""


@contextlib.contextmanager
def captured_output() -> Iterator[Captured]:
    """Everything written to stderr (the file descriptor, so tensorstore's C++ logging too),
    `sys.stderr`, the root logger and `sys.unraisablehook` inside the block goes to `.text`
    instead, available on exit.

    A failed restore makes tensorstore and asyncio print hundreds of lines; the caller keeps
    them in a file and shows one line. Process-wide while it lasts (restores run before training).
    """
    captured = Captured()
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    root.handlers = [handler]
    saved_hook = sys.unraisablehook

    def unraisable(u) -> None:  # exceptions in finalizers and callbacks
        if _log_if_stray(u):  # an earlier failed restore's, arriving during this one
            return
        buffer.write(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n")
        buffer.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

    sys.unraisablehook = unraisable
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as raw:
        os.dup2(raw.fileno(), 2)
        try:
            with contextlib.redirect_stderr(buffer):
                yield captured
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sys.unraisablehook = saved_hook
            root.handlers = saved_handlers
            raw.seek(0)
            captured.text = raw.read().decode("utf-8", errors="replace") + buffer.getvalue()


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` carrying `shardings` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class StopSignal:
    """Turns SIGTERM (preemption) into a flag the step loop polls; the loop then saves and exits.

    Only installs in the main thread (Python's rule) and restores the previous handler on exit.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopSignal":
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

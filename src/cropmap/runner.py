"""How a ``cropmap <stage>`` command runs: its log, its one error line, its outputs on failure.

* ``--log FILE``: the command writes its whole output into ``FILE`` itself (file descriptors 1
  and 2 are redirected, so what libraries, GDAL and child processes print lands there too),
  and the final one-line error goes both into the log and to the stderr the command was started
  with: under ``snakemake`` that is the terminal, so the user reads the line without opening the
  log (Snakemake still prints its own pointer to the log).
* A :class:`~cropmap.errors.CropmapError` ends as ``cropmap <stage>: error: <message>`` (exit
  status 1). Anything else is a bug: ``cropmap <stage>: internal error: ...``, with the
  traceback in the log (or printed above the line when there is no log).
* Outputs: a stage that fails leaves none of its outputs behind (like Snakemake does for a
  failed job, also when the command is run by hand): every output path that did not exist
  before the run, or that the run changed, is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cropmap.errors import CropmapError, MissingParamError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class Params(dict):
    """Stage parameters (``--params`` JSON): a missing key is one line naming it, not a ``KeyError``."""

    def __missing__(self, key: str) -> Any:
        raise MissingParamError(
            f"--params lacks the key {key!r}: pass the stage's slice of the config as JSON "
            "(cropmap.config.stage_params; the Snakemake rules do this)"
        )


def parse_params(text: str, flag: str = "--params") -> Params:
    """``--params`` (or another ``flag``'s) JSON as :class:`Params` (nested mappings too).

    Raises:
        ConfigError: the text is not a JSON object.
    """
    try:
        params = json.loads(text, object_hook=Params)
    except ValueError as exc:
        raise MissingParamError(f"{flag} is not valid JSON ({exc}); pass one JSON object") from None
    if not isinstance(params, Params):
        raise MissingParamError(f"{flag} is {type(params).__name__} JSON, not an object; pass one JSON object")
    return params


def _stamp(path: Path) -> int | None:
    """Modification time of ``path`` (``None`` if it does not exist)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@contextlib.contextmanager
def outputs_removed_on_failure(outputs: Iterable[Path]) -> Iterator[None]:
    """Remove every output the block created or changed if it raises (then re-raise)."""
    before = {Path(p): _stamp(Path(p)) for p in outputs}
    try:
        yield
    except BaseException:
        for path, stamp in before.items():
            after = _stamp(path)
            if after is not None and after != stamp:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        raise


@contextlib.contextmanager
def job_log(path: Path | None, verbose: bool = False) -> Iterator[Callable[[str], None]]:
    """Send the command's output to ``path`` (when given) and yield ``say(line)``: writes the
    final line into the log and to the stderr the command was started with.

    Without ``path`` output goes where it always goes and ``say`` writes to stderr.
    """
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if path is None:
        logging.basicConfig(level=level, format=LOG_FORMAT)
        root.setLevel(level)
        yield lambda line: print(line, file=sys.stderr, flush=True)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a DDP child re-runs this command: it adds to the log its launcher started
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if os.environ.get("LOCAL_RANK", "0") != "0" else os.O_TRUNC)
    old_out, old_err = sys.stdout, sys.stderr
    for stream in (old_out, old_err):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = _terminal(old_err, saved[2])
    log_fd = os.open(path, flags, 0o666)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    # streams on the descriptors themselves, never closed: a handler a library creates during
    # the run (Lightning adds its own) keeps writing to descriptor 2, never to a closed file
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = err = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(level)

    def say(line: str) -> None:
        err.write(line + "\n")
        err.flush()
        terminal.write(line + "\n")
        terminal.flush()

    try:
        yield say
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        sys.stdout, sys.stderr = old_out, old_err
        for fd, dup in saved.items():
            os.dup2(dup, fd)
            os.close(dup)
        if terminal is not old_err:
            with contextlib.suppress(OSError):
                terminal.close()


def _terminal(stream: IO[str], saved_fd: int) -> IO[str]:
    """Where the final line goes: the saved descriptor 2 if ``stream`` is the process's stderr,
    else ``stream`` itself (e.g. a test's captured stderr)."""
    try:
        real = stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace") if real else stream


def run_stage(stage: str, fn: Callable[[], None], outputs: Iterable[Path], log_path: Path | None, verbose: bool = False) -> int:
    """Run one stage: its outputs removed if it fails, its failure as one line.

    Args:
        stage: the stage name (``cropmap <stage>``).
        fn: runs the stage.
        outputs: the stage's output paths.
        log_path: ``--log``: the stage's log file.
        verbose: debug logging.

    Returns:
        The exit status: 0, 1 (an error) or 130 (interrupted).
    """
    with job_log(log_path, verbose) as say:
        try:
            with outputs_removed_on_failure(outputs):
                fn()
        except CropmapError as exc:
            say(f"cropmap {stage}: error: {one_line(exc)}")
            return 1
        except KeyboardInterrupt:
            say(f"cropmap {stage}: interrupted; its outputs were removed, rerun it")
            return 130
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            where = f"the traceback is in {log_path}" if log_path else "the traceback is above"
            say(f"cropmap {stage}: internal error: {type(exc).__name__}: {one_line(exc)} "
                f"(a bug in cropmap; {where}: please report it)")
            return 1
    return 0


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    text = str(exc).strip()
    return " ".join(text.split()) if text else type(exc).__name__

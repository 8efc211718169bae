"""One exception type for every user-facing failure, and the checks that raise it early.

The CLI turns a ``PipelineError`` into a single line on stderr and a non-zero
exit code, so every message must name the file (or store) and the problem on
one line. Anything else escaping is a bug in this package, not bad input.

The checks below run before a job touches the disk: a bad number or an output
folder on top of the job's own inputs must fail while nothing is written yet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(" ".join(text.split()))  # always one line


class SchedulerLost(PipelineError):
    """The Dask scheduler went away mid-job.

    Its workers may still be running (and writing) the job's tasks, so what a
    job would remove after another failure is left in place: the re-run on a
    live scheduler resumes from it.
    """


def check_number(value: float, what: str, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> float:
    """``value`` as a float if finite and in [low, high] (``low_open``: (low, high]).

    NaN has to be refused explicitly: every comparison with it is False, so a
    range check alone lets it through (``--alpha nan`` once wrote a NaN model).
    """
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise PipelineError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise PipelineError(f"{what} must be a finite number, got {value!r}")
    if low is not None and (x <= low if low_open else x < low):
        raise PipelineError(f"{what} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and x > high:
        raise PipelineError(f"{what} must be <= {high:g}, got {value!r}")
    return x


def check_int(value: int, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an integer in [low, high] (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PipelineError(f"{what} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise PipelineError(f"{what} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise PipelineError(f"{what} must be <= {high}, got {value}")
    return value


def check_size(value: str | int, what: str) -> int:
    """Bytes in ``value`` (``"5GB"``, ``"1GiB"``, ``1234``), read by ``dask.utils.parse_bytes``
    (one size syntax for shards, memory limits and block sizes), if positive."""
    from dask.utils import parse_bytes

    shown = repr(value) if len(str(value)) <= 40 else repr(str(value)[:40] + "...")
    if isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise PipelineError(f"{what} must be a size such as 5GB, got {shown}")
    try:
        n = parse_bytes(value)
    except (ValueError, TypeError, OverflowError):
        raise PipelineError(f"{what} is not a usable size: {shown} (expected e.g. 5GB, 200MB, "
                            f"1GiB)") from None
    if n <= 0:
        raise PipelineError(f"{what} must be positive, got {shown}")
    return n


Protected = tuple[str, "str | Path"]  # (what it is, e.g. "the store", its path)


def _ids(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of ``path`` and each existing ancestor, symlinks followed.

    Comparing identities rather than strings catches symlinks, ``..``, bind
    mounts and case-insensitive file systems alike.
    """
    out = []
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino))
    return out


def _id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(out: str | Path, inputs: Iterable[Protected], *, replaces: bool = False,
                 writes: Sequence[str] = (), option: str = "--out") -> None:
    """Refuse an output that is, sits inside, or would overwrite an input of the job.

    ``inputs``: (description, path) of everything the job reads (stores,
    checkpoint folders, run folders); missing ones are skipped. ``replaces``:
    the job replaces the whole ``out`` folder (``extrapolate --force``), so
    ``out`` may not contain an input either. ``writes``: names the job creates
    or replaces inside ``out``; none of them may be or contain an input.
    ``option`` names the option to change in the message.
    """
    target = Path(os.path.realpath(out))
    above = set(_ids(target))  # out and everything above it
    own = _id(target)
    for what, path in inputs:
        p = Path(os.path.realpath(path))
        pid = _id(p)
        if pid is None:
            continue
        if pid in above:
            rel = "is" if pid == own else "is inside"
            raise PipelineError(f"output {rel} {what} ({p}), which this job reads; "
                                f"choose another {option}", out)
        chain = set(_ids(p))
        if replaces and own is not None and own in chain:
            raise PipelineError(f"output contains {what} ({p}), which this job reads, and "
                                f"would replace it; choose another {option}", out)
        for name in writes:
            wid = _id(target / name)
            if wid is not None and wid in chain:
                raise PipelineError(f"writing {name} here would overwrite {what} ({p}), "
                                    f"which this job reads; choose another {option}", out)


def _not_compute_failed(record: object) -> bool:
    """Also drops the heartbeat error of a worker whose cluster is closing after a failure."""
    msg = str(getattr(record, "msg", ""))
    return not (msg.startswith("Compute Failed")
                or msg.startswith("Failed to communicate with scheduler during heartbeat"))


def _not_cancelled_at_close(record: object) -> bool:
    """Drop "Async instruction ... ended with CancelledError": the worker's tasks being
    cancelled because the client closed the cluster after a failure (its traceback of a
    closed stream says nothing the client's one line has not)."""
    return not str(getattr(record, "msg", "")).startswith("Async instruction for")


def dask_setup(worker: object) -> None:
    """Dask worker preload (``distributed.worker.preload = ["pipeline.errors"]``).

    A task that fails (a full disk, a bad checkpoint) is re-raised in the
    client, where the CLI reports it as one line; the worker's own "Compute
    Failed" log record repeats it with a traceback on stderr, so it is dropped.
    """
    import logging

    logging.getLogger("distributed.worker").addFilter(_not_compute_failed)
    logging.getLogger("distributed.worker.state_machine").addFilter(_not_cancelled_at_close)

"""Writes that a crash, a full disk or a signal cannot leave half done.

Files go to a temporary name in the same folder and are renamed over the target only when
complete, so an existing file survives any failure. Directories are filled under a hidden
PID-tagged staging name (`.NAME.partial-PID`); the next writer removes what dead processes
left and refuses to race a live one.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

STAGING = ".{name}.partial-"
# what a write fails with when the disk, the file-size limit or the quota is reached
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `path` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open_for_writing(tmp) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in DISK_FULL:
            raise UserError(
                f"could not write {path}: {err.strerror}; "
                + ("the old file is unchanged; " if path.exists() else "")
                + "free some space or write elsewhere"
            ) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | memoryview | str) -> None:
    """Write `data` (str as UTF-8) to `path`: readers see the old file or the whole new one."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def disk_full(err: BaseException) -> OSError | None:
    """The out-of-space OSError behind `err`: itself, or one it was raised from or while
    handling (libraries such as torch.onnx let it through from deep inside), else None."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def open_for_writing(path: Path) -> BinaryIO:
    """`open(path, "wb")` with the failures a user can fix as one line."""
    try:
        return path.open("wb")
    except PermissionError as err:
        raise UserError(
            f"cannot write {path.parent}: permission denied; choose a folder you can write to"
        ) from err
    except FileNotFoundError as err:
        raise UserError(f"folder {path.parent} does not exist; create it first") from err


def staging_dir(final: Path) -> Path:
    """A fresh hidden sibling of `final` for this process to fill (see `clear_staging`)."""
    clear_staging(final)
    staging = final.with_name(f"{STAGING.format(name=final.name)}{os.getpid()}")
    staging.mkdir()
    return staging


def clear_staging(final: Path) -> None:
    """Remove staging that dead processes left for `final`, naming each; UserError if a live
    process is writing `final`."""
    for pid, leftover in _staging_of(final):
        if pid == os.getpid():
            shutil.rmtree(leftover, ignore_errors=True)
        elif _alive(pid):
            raise UserError(
                f"another sdrt process (pid {pid}) is writing {final} right now; wait for it "
                "to finish or choose another destination"
            )
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            print(
                f"removed {leftover}, left by process {pid} that was stopped mid-write",
                file=sys.stderr,
            )


def _staging_of(final: Path) -> list[tuple[int, Path]]:
    prefix = STAGING.format(name=final.name)
    found = []
    for path in final.parent.glob(f"{prefix}*"):
        suffix = path.name[len(prefix) :]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

"""What fedsim may delete or overwrite: only what it wrote itself.

Every directory fedsim creates for its output (a run directory and its ``.partial`` staging copy, a
bench directory, a report's assets folder, a teaching figure's folder) holds a marker file,
:data:`MARKER`, naming its kind. fedsim removes or replaces a directory only when it carries the
marker of the expected kind (or is empty); anything else in the way is refused with a
:class:`~fedsim.errors.FedsimError` naming the path, before any work is done and without touching it.
Files that fedsim overwrites carry their own signature, checked by their writer (a prior's ``format``
field, the report's generator meta tag, the sample grid's PNG text chunk).

Names read from user files and used as one path component (scenario, grid and prior names) go
through :func:`check_name`; relative paths read from fedsim's own files (a ``cells.jsonl`` record's
``run_dir``) through :func:`confined`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fedsim.errors import FedsimError

MARKER = ".fedsim-output"
"""File name of the marker fedsim writes into every directory it creates (JSON: ``{"kind": ...}``)."""

RUN, BENCH, REPORT_ASSETS, FIGURES = "run", "bench", "report-assets", "figures"


def _marker_kind(path: Path) -> str | None:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def is_owned(path: str | Path, kind: str) -> bool:
    """Whether ``path`` is a directory fedsim created as a ``kind`` (it holds the marker of that kind)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and _marker_kind(path) == kind


def is_empty_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def mark(path: str | Path, kind: str) -> None:
    """Write the marker of ``kind`` into the directory ``path`` (which fedsim has just created or claimed)."""
    (Path(path) / MARKER).write_text(json.dumps({"kind": kind, "by": "fedsim"}) + "\n", encoding="utf-8")


def new_owned_dir(path: str | Path, kind: str) -> Path:
    """Create ``path`` (parents as needed; it must not exist) and mark it; FedsimError if it exists."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise FedsimError(f"{path} already exists; fedsim never writes into a directory it did not create") from None
    except OSError as err:
        raise FedsimError(f"cannot create {path}: {err.strerror or err}") from None
    mark(path, kind)
    return path


def remove_owned(path: str | Path, kind: str, what: str = "directory") -> None:
    """Delete ``path`` if it is fedsim's ``kind`` directory (or an empty directory); do nothing if it is
    absent; otherwise raise FedsimError and leave it as it is."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if is_empty_dir(path):
        path.rmdir()
    elif is_owned(path, kind):
        shutil.rmtree(path)
    else:
        raise FedsimError(f"{path} is in the way and is not a fedsim {what} (no {MARKER} marker of kind "
                          f"{kind!r}); fedsim does not delete what it did not create: move it or choose another path")


def check_replaceable(path: str | Path, kind: str, field: str, overwrite: bool, what: str) -> None:
    """Refuse (FedsimError at ``field``) unless ``path`` is absent, an empty directory, or -- with
    ``overwrite`` -- a directory fedsim created as ``kind``. Nothing is touched."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if is_empty_dir(path):
        return
    if not path.is_dir() or path.is_symlink():
        raise FedsimError(f"{field}: {path} exists and is not a directory; choose another path")
    if not is_owned(path, kind):
        raise FedsimError(f"{field}: {path} exists and is not a fedsim {what} (no {MARKER} marker); fedsim never "
                          "deletes what it did not create: choose another path")
    if not overwrite:
        raise FedsimError(f"{field}: {path} already holds a fedsim {what}; pass --overwrite to replace it, "
                          "or choose another path")


def claim_dir(path: str | Path, kind: str, field: str, what: str) -> Path:
    """A directory fedsim may write into: created and marked when absent, marked when empty, accepted when
    already fedsim's ``kind``; anything else is refused (FedsimError at ``field``), untouched."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return new_owned_dir(path, kind)
    if is_empty_dir(path):
        mark(path, kind)
        return path
    if not path.is_dir() or path.is_symlink():
        raise FedsimError(f"{field}: {path} exists and is not a directory; choose another path")
    if not is_owned(path, kind):
        raise FedsimError(f"{field}: {path} is not empty and is not a fedsim {what} (no {MARKER} marker); "
                          "fedsim does not write into or delete what it did not create: choose another path")
    return path


def fresh_partial(final: Path, kind: str) -> Path:
    """``<final>.partial``, created new and marked: a stale one fedsim left (killed run) is deleted first;
    a path of that name that fedsim did not create is refused."""
    partial = final.with_name(final.name + ".partial")
    remove_owned(partial, kind, f"{kind} directory")
    return new_owned_dir(partial, kind)


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be used as a single path component (None when it can)."""
    if not name or not name.strip():
        return "must not be empty"
    if any(sep in name for sep in ("/", "\\", "\0")):
        return f"{name!r} contains a path separator; it names a file or folder that must stay inside its directory"
    if name in (".", ".."):
        return f"{name!r} would name a folder outside its directory"
    return None


def confined(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it stays inside ``root`` (after resolving ``..`` and links), else None."""
    if not relative or os.path.isabs(relative) or "\0" in relative:
        return None
    base = Path(root).resolve()
    target = (base / relative).resolve()
    return target if target == base or base in target.parents else None


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through a new, uniquely named temporary file in the same folder (fsync, then rename).

    The temporary name is created exclusively, so no other file is ever truncated; the caller has
    decided that ``path`` itself may be replaced.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""The artifact folder: ``<output>/<name>/<version>/`` written under a temporary name, renamed into
place only when complete, with ``<output>/<name>/latest`` naming the newest complete version."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest"
STAGING_PREFIX = ".staging-"


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def make_readable(path: Path) -> None:
    """Give a file the mode a plain ``open()`` would have (0644 under the usual umask): a
    temporary file is made 0600, which the service and the batch Jobs, running as other user
    ids in the artifacts' group, could not read."""
    os.chmod(path, 0o666 & ~_umask())


def write_json(path: Path, content: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        json.dump(content, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    make_readable(Path(handle.name))
    os.replace(handle.name, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def new_version(model_dir: Path) -> str:
    """A sortable UTC time stamp such as ``20261125-013000``, unique within ``model_dir``.

    Digits and a dash only: model-store tags are lower case.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    version, suffix = stamp, 1
    while (model_dir / version).exists():
        suffix += 1
        version = f"{stamp}-{suffix}"
    return version


def point_latest(model_dir: Path, version: str) -> None:
    """Atomically make ``model_dir/latest`` a relative symlink to ``version``."""
    temporary = model_dir / f".{LATEST}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(version, target_is_directory=True)
    os.replace(temporary, model_dir / LATEST)


@contextlib.contextmanager
def staged_version(
    output: Path, name: str, promote: Callable[[], bool] = lambda: True
) -> Iterator[tuple[Path, str]]:
    """Yield ``(staging_dir, version)``; on success rename it to ``output/name/version`` and, if
    ``promote()`` says so then, point ``latest`` at it. On any error or interrupt the staging
    folder is removed and the versions already there, ``latest`` included, are left
    untouched."""
    model_dir = Path(output) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = new_version(model_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_dir))
    try:
        yield staging, version
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final = model_dir / version
    # mkdtemp made it 0700: give it the model folder's mode, and every file in it a plain
    # file's, so that the service and the batch Jobs, which run under other user ids of the
    # artifacts' group, can read what the training Job wrote.
    staging.chmod(model_dir.stat().st_mode & 0o777)
    for path in staging.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o777 & ~_umask())
        elif path.is_file() and not path.is_symlink():
            make_readable(path)
    os.rename(staging, final)
    if promote():
        point_latest(model_dir, version)
        log.info("artifacts written to %s (%s -> %s)", final, model_dir / LATEST, version)
    else:
        log.info("artifacts written to %s; %s left as it was", final, model_dir / LATEST)


def resolve_artifact(path: Path) -> Path:
    """The real version folder behind ``path`` (which may be a ``latest`` link)."""
    resolved = Path(path).resolve()
    if not (resolved / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path} is not an artifact folder (no metadata.json): train first with 'make train'"
        )
    return resolved


def git_commit() -> str | None:
    """The commit of the code that trained the model, with ``-dirty`` if it had local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit

"""A real PostgreSQL for the tests and the benchmarks: Debian's ``initdb`` and ``pg_ctl`` on a
temporary data folder and a free loopback port. As root they run as the ``postgres`` user (they
refuse root)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from benchmarks.servers import free_port


def binaries() -> Path:
    """The folder of the installed PostgreSQL's programs (the newest version installed)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL is not installed: run bash tests/system-packages.sh")


class Postgres:
    """One server; :meth:`stop` and :meth:`start` take it down and bring it back on its port."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.start()

    def _run(self, program: str, *args: str) -> None:
        command = [str(binaries() / program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        # The server that pg_ctl starts keeps its output: a pipe here would never close.
        finished = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if program != "pg_ctl" else subprocess.DEVNULL,
            timeout=120,
        )
        if finished.returncode:
            log = self.root / "log"
            detail = finished.stderr or (log.read_bytes()[-2000:] if log.exists() else b"")
            raise RuntimeError(f"{program} failed: {detail.decode(errors='replace')}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

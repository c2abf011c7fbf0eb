"""Connecting to the prediction log's database and migrating its schema.

``DATABASE_URL`` names PostgreSQL (``postgresql://user:password@host:5432/db``; the psycopg 3
driver is used whatever the URL's scheme spells); without it, the embedded default is one SQLite
file that the workers of one machine share. The schema is migrated with Alembic when a process
first connects: under a PostgreSQL advisory lock, or SQLite's write lock, so that replicas
starting together migrate once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

SQLITE_FILE = "predictions.sqlite3"
MIGRATIONS = Path(__file__).with_name("migrations")
# Any fixed number: the advisory lock that one migrating process holds at a time.
MIGRATION_LOCK = 7_130_211
# Seconds to wait for a connection before the database counts as down.
CONNECT_TIMEOUT = 3


def database_url(url: str, folder: Path) -> URL:
    """The URL to connect to: ``url`` (a ``postgresql://`` or ``sqlite:///`` URL), else the
    SQLite file in ``folder``."""
    if not url:
        return make_url(f"sqlite:///{Path(folder) / SQLITE_FILE}")
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ValueError(f"DATABASE_URL: use a postgresql:// URL (got {parsed.drivername}://)")
    return parsed


def shown(url: URL) -> str:
    """The URL without its password, for logs and messages."""
    return url.render_as_string(hide_password=True)


def create_engine(url: URL) -> Engine:
    """An engine whose connections fail fast when the database is down, and whose SQLite
    transactions take the write lock at BEGIN (so that a claim is as exclusive as PostgreSQL's
    ``FOR UPDATE``)."""
    if url.get_backend_name() == "sqlite":
        if url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlalchemy.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not pysqlite's
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            # A label answered 2xx is on disk: FULL syncs the log at each commit.
            dbapi_connection.execute("PRAGMA synchronous=FULL")

        @event.listens_for(engine, "begin")
        def begin(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sqlalchemy.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=4,
        pool_timeout=CONNECT_TIMEOUT,
        connect_args={"connect_timeout": CONNECT_TIMEOUT},
    )


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest migration, once even when many processes start at once."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be reached (rather than a bug)."""
    return isinstance(
        error,
        (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.TimeoutError,
        ),
    )


class LogUnreadable(RuntimeError):
    """The prediction log named by a URL cannot be read: the message names it and why."""


@contextlib.contextmanager
def reading(url: str) -> Iterator[tuple[sqlalchemy.Connection, str]]:
    """A connection for reading the prediction log at ``url`` (the commands that report from it),
    and the URL as shown; a bad URL, a database that does not answer and one without the log's
    tables raise :class:`LogUnreadable`."""
    try:
        parsed = database_url(url, Path("."))
    except (ValueError, sqlalchemy.exc.ArgumentError) as error:
        raise LogUnreadable(str(error)) from None
    try:
        with create_engine(parsed).connect() as connection:
            yield connection, shown(parsed)
    except sqlalchemy.exc.OperationalError as error:
        raise LogUnreadable(f"{shown(parsed)}: {error.orig or error}") from None
    except sqlalchemy.exc.ProgrammingError:
        raise LogUnreadable(f"{shown(parsed)} holds no prediction log") from None

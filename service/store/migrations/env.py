"""Alembic's environment: migrations run on the connection that
:func:`service.store.database.migrate` hands over (inside its lock), never from a URL of its own."""

from alembic import context

from service.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()

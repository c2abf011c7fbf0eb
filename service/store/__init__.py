"""The prediction log: every answered image and the labels that come back for it, in one database
that every replica and worker shares (PostgreSQL with ``DATABASE_URL``, else an embedded SQLite
file), its schema versioned by Alembic (:mod:`service.store.database`, :mod:`service.store.log`)."""

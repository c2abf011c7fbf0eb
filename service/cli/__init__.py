"""The offline batch CLI (``python -m service.predict``): classify files and folders, in shards,
with decoding processes, and merge the shards. Imports :mod:`service.core`, never
:mod:`service.http`."""

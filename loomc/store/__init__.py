"""Checkpoint stores.

- ``protocol``: ``CheckpointStore`` / ``AsyncCheckpointStore`` and the data they carry.
- ``core``: every store operation, written once as a sans-I/O generator of database requests.
- ``sqlite/``: the SQLite dialect (``sql``), its sync driver (``sync``) and async driver (``aio``).
- ``memory``: the memory store; ``open``: ``open_store``; ``codec``: states; ``lease``: leases.
"""

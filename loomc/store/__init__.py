"""Checkpoint stores: the protocol, the state codec, leases, and the SQLite and memory stores."""

"""The embedded SQLite store: its statements and schema, the sync store and the async (aiosqlite) store."""

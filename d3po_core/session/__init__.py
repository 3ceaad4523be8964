"""The on-disk session (DESIGN §3.7): :class:`Session` stores, :mod:`.reports` sums it up.

``store`` holds the Session class (SQLite and files, durability, recovery, tables as pandas
DataFrames); ``schema`` its tables; ``files`` the fsync-and-rename plumbing and the sweep of
what a crash leaves; ``reports`` the summaries computed from the session's DataFrames.
"""

from d3po_core.errors import SessionError

from .store import Session

__all__ = ["Session", "SessionError"]

"""Reading Parquet from fsspec file handles without aborting the process at exit.

Arrow reads a Python file object into buffers that wrap Python ``bytes``. When one of Arrow's pool
threads (``pre_buffer`` reads on the I/O pool, ``use_threads`` decoding on the CPU pool) drops the
last reference to such a buffer after the read has returned, it must take the GIL; if the
interpreter is shutting down by then, Python ends that thread, the unwinding meets C++ code that
may not throw, and the process aborts with "terminate called without an active exception" (rc -6,
apache/arrow#34314). Reading with ``pre_buffer=False`` and ``use_threads=False`` keeps every read and
every such buffer on the calling thread. For small reads (an id column, a slice of rows) it costs
nothing measurable; decoding many wide row groups runs on one core instead of all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["open_parquet", "read_parquet"]


def open_parquet(handle: IO[bytes]) -> pq.ParquetFile:
    """``pq.ParquetFile`` over a Python file handle, reading on the calling thread only.

    Pass ``use_threads=False`` to its ``read`` / ``read_row_group`` / ``iter_batches`` calls too
    (Arrow's default decodes on its CPU pool).
    """
    return pq.ParquetFile(handle, pre_buffer=False)


def read_parquet(handle: IO[bytes], columns: Sequence[str] | None = None) -> pa.Table:
    """The whole table (or ``columns``) of a Parquet file handle, read on the calling thread only."""
    wanted = list(columns) if columns is not None else None
    return open_parquet(handle).read(columns=wanted, use_threads=False)

"""Rows of an Arrow table by index, in bounded memory.

pyarrow's ``Table.take`` on a column of many chunks (a prepared examples file holds one chunk per written batch)
first concatenates the chunks into one array: gathering 10,000 examples from a 1.6 GB memory-mapped table cost
0.9 GB of anonymous memory and 0.6 s, and a million-conversation preparation peaked at 3.7 GB while packing.
:class:`ChunkedRows` takes from each chunk separately and touches only the rows asked for.

Reading a memory-mapped file in random order has a second cost: the pages a gather touches become part of the
process (its RSS), and not one page at a time. With large page-cache folios (ext4 on Linux 6.x) one touch maps the
whole folio around it: taking 500 random examples of a 586 MB examples file made 336 MB of it resident, and packing
a million conversations held 2.9 GB of the file at once even with the pages handed back after every gather.
:class:`FileRows` therefore reads the rows of a stream file with positional reads (``preadv``) straight into the
result: the kernel copies only the bytes asked for out of its page cache, and nothing of the file is mapped into
the process. :class:`MappedStream` still maps the file, for the zero-copy table of its small columns and to find
where every row's values lie in it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class MappedStream:
    """An Arrow stream file mapped read-only (zero-copy table), whose resident pages can be handed back, and read by
    position (:meth:`rows`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(path, "rb") as f:
            self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buffer = pa.py_buffer(self._mapping)
        self.table = pa.ipc.open_stream(self._buffer).read_all()

    def rows(self, columns: Sequence[str]) -> FileRows:
        """Positional-read access to the rows of ``columns`` (lists of a fixed-width type)."""
        return FileRows(self, columns)

    def file_offset(self, buffer: pa.Buffer) -> int:
        """Where a buffer of :attr:`table` starts in the file."""
        return buffer.address - self._buffer.address

    def release_pages(self) -> None:
        """Drop the mapped pages from this process (re-read from the page cache on the next access)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)


class ChunkedRows:
    """``take`` over the record batches of a table, one chunk at a time, the result in the order asked for."""

    def __init__(self, table: pa.Table, columns: Sequence[str]) -> None:
        selected = table.select(list(columns))
        self.batches = selected.to_batches()  # zero-copy views of the (memory-mapped) chunks
        self.schema = selected.schema
        sizes = np.fromiter((b.num_rows for b in self.batches), dtype=np.int64, count=len(self.batches))
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.num_rows = int(sizes.sum())

    def take(self, index: np.ndarray, memory_pool: pa.MemoryPool | None = None) -> pa.Table:
        """The rows at ``index`` (any order, repeats allowed), as one table of a single chunk per column, allocated
        from ``memory_pool`` (default: Arrow's)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) == 0:
            return self.schema.empty_table()
        if index.min() < 0 or index.max() >= self.num_rows:
            raise IndexError(f"row index out of range 0..{self.num_rows - 1}")
        chunk = np.searchsorted(self.starts, index, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        cuts = np.flatnonzero(np.diff(chunk[order])) + 1
        pieces = []
        for group in np.split(order, cuts):
            c = int(chunk[group[0]])
            pieces.append(pc.take(self.batches[c], pa.array(index[group] - self.starts[c]), memory_pool=memory_pool))
        gathered = pa.Table.from_batches(pieces, schema=self.schema).combine_chunks(memory_pool=memory_pool)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        # one chunk now: no concatenation of the source
        return pc.take(gathered, pa.array(inverse), memory_pool=memory_pool)


class FileRows:
    """``take`` by positional reads from the file of a :class:`MappedStream`, for list columns of fixed-width values.

    Where each row's values lie in the file (a start and a length: 16 bytes per row and column, 32 MB for the million
    examples of the 1M-conversation benchmark) is read once from the list offsets, and the mapped pages that touches
    are handed back at once. A take then reads every row's bytes into one result buffer per column; the result is
    the same table as :meth:`ChunkedRows.take`.
    """

    def __init__(self, stream: MappedStream, columns: Sequence[str]) -> None:
        self.path = stream.path
        selected = stream.table.select(list(columns))
        self.schema = selected.schema
        self._starts: list[np.ndarray] = []  # per column: file offset of each row's first value
        self._sizes: list[np.ndarray] = []  # per column: bytes of each row's values
        self._types = []
        for name in selected.column_names:
            value_type = selected.schema.field(name).type.value_type
            width = value_type.bit_width // 8
            starts, sizes = [], []
            for chunk in selected.column(name).chunks:
                values = chunk.values
                if values.null_count or chunk.null_count:
                    raise ValueError(f"column {name}: nulls cannot be read by position")
                offsets = chunk.offsets.to_numpy().astype(np.int64)
                base = stream.file_offset(values.buffers()[1]) + values.offset * width
                starts.append(base + offsets[:-1] * width)
                sizes.append(np.diff(offsets) * width)
            self._starts.append(np.concatenate(starts) if starts else np.zeros(0, np.int64))
            self._sizes.append(np.concatenate(sizes) if sizes else np.zeros(0, np.int64))
            self._types.append((value_type, width))
        self.num_rows = len(self._starts[0]) if self._starts else 0
        stream.release_pages()

    def take(self, index: np.ndarray) -> pa.Table:
        """The rows at ``index`` (any order, repeats allowed), one chunk per column."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.num_rows):
            raise IndexError(f"row index out of range 0..{self.num_rows - 1}")
        arrays = []
        with open(self.path, "rb", buffering=0) as f:
            for starts, sizes, (value_type, width) in zip(self._starts, self._sizes, self._types):
                arrays.append(_read_lists(f, starts[index], sizes[index], value_type, width))
        return pa.Table.from_arrays(arrays, schema=self.schema)


def _read_lists(f: Any, starts: np.ndarray, sizes: np.ndarray, value_type: pa.DataType, width: int) -> pa.Array:
    """A list array whose row i is the ``sizes[i]`` bytes at ``starts[i]`` of the file, read as ``value_type``."""
    ends = np.cumsum(sizes)
    out = bytearray(int(ends[-1]) if len(ends) else 0)
    view = memoryview(out)
    for start, size, end in zip(starts.tolist(), sizes.tolist(), ends.tolist()):
        if size and _read_at(f, view[end - size : end], start) != size:
            raise OSError(f"short read at byte {start} of an examples file")
    offsets = np.concatenate([[0], ends // width]).astype(np.int32)
    values = pa.Array.from_buffers(value_type, len(out) // width, [None, pa.py_buffer(out)])
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def _read_at(f: Any, target: memoryview, offset: int) -> int:
    """Fill ``target`` from byte ``offset`` of the open file ``f``: one system call where there is ``preadv``."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [target], offset)
    f.seek(offset)  # Windows
    return f.readinto(target) or 0

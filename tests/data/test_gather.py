"""Gathering rows from a memory-mapped, many-chunk Arrow table: the same rows as ``Table.take``, without its copy,
and from its file by positional reads, without mapping it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from trainer.data.gather import ChunkedRows, MappedStream

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def write_chunks(path, chunks: int, rows: int, seed: int = 0) -> pa.Table:
    """A stream file of ``chunks`` record batches of ``rows`` examples (100-400 tokens), read back memory-mapped."""
    rng = np.random.default_rng(seed)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for _ in range(chunks):
            offsets = np.concatenate([[0], np.cumsum(rng.integers(100, 400, rows))]).astype(np.int32)
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 30000, offsets[-1], np.int32)))
            labels = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(-100, 30000, offsets[-1],
                                                                                         np.int32)))
            writer.write_batch(pa.RecordBatch.from_arrays([ids, labels], schema=SCHEMA))
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def test_same_rows_as_table_take_in_any_order_with_repeats(tmp_path):
    table = write_chunks(tmp_path / "t.arrow", chunks=7, rows=50)
    rows = ChunkedRows(table, ["input_ids", "labels"])
    rng = np.random.default_rng(1)
    for index in (rng.permutation(350)[:120], np.array([349, 0, 0, 175, 49, 50]), np.arange(350)):
        assert rows.take(index).equals(table.take(pa.array(index)))
    assert rows.take(np.array([], dtype=np.int64)).num_rows == 0
    with pytest.raises(IndexError):
        rows.take(np.array([350]))


def test_taking_a_few_rows_does_not_copy_the_table(tmp_path):
    """Arrow's own take concatenates every chunk of the column first: here ~60 MB to return ~2 MB."""
    table = write_chunks(tmp_path / "t.arrow", chunks=200, rows=200)  # 40,000 examples, ~80 MB memory-mapped
    index = np.random.default_rng(2).permutation(table.num_rows)[:1000]
    arrow_pool, our_pool = (pa.proxy_memory_pool(pa.default_memory_pool()) for _ in range(2))
    expected = pc.take(table, pa.array(index), memory_pool=arrow_pool)
    taken = ChunkedRows(table, ["input_ids", "labels"]).take(index, memory_pool=our_pool)
    assert taken.equals(expected)
    peaks = arrow_pool.max_memory(), our_pool.max_memory()
    result_bytes = taken.nbytes
    del expected, taken  # freed before the pools they were allocated from
    assert peaks[0] > 0.5 * table.nbytes, "Arrow's take no longer copies the table: ChunkedRows may go"
    assert peaks[1] < 4 * result_bytes, f"peak {peaks[1]:,} B for a {result_bytes:,} B result"


def _resident_file_mib() -> float:
    line = next(x for x in open("/proc/self/status") if x.startswith("RssFile"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_positional_reads_leave_nothing_of_the_file_resident(tmp_path):
    """Gathering every row of a file in random order: through the mapping most of the file becomes part of the
    process (whole page-cache folios per touch), through positional reads none of it."""
    write_chunks(tmp_path / "t.arrow", chunks=200, rows=200)  # ~80 MB on disk
    index = np.random.default_rng(3).permutation(40_000)
    stream = MappedStream(tmp_path / "t.arrow")

    def resident_growth(rows) -> float:
        stream.release_pages()
        before, most = _resident_file_mib(), 0.0
        for part in np.array_split(index, 20):
            rows.take(part)
            most = max(most, _resident_file_mib() - before)
        return most

    by_position = stream.rows(["input_ids", "labels"])
    assert resident_growth(ChunkedRows(stream.table, ["input_ids", "labels"])) > 40  # the test can fail
    assert resident_growth(by_position) < 2


def test_positional_reads_give_the_rows_of_table_take(tmp_path):
    table = write_chunks(tmp_path / "t.arrow", chunks=7, rows=50)
    stream = MappedStream(tmp_path / "t.arrow")
    rows = stream.rows(["input_ids", "labels"])
    rng = np.random.default_rng(4)
    for index in (rng.permutation(350)[:120], np.array([349, 0, 0, 175, 49, 50]), np.arange(350)):
        assert rows.take(index).equals(table.take(pa.array(index)))
    assert rows.take(np.array([], dtype=np.int64)).num_rows == 0
    assert rows.take(np.array([], dtype=np.int64)).schema == SCHEMA
    with pytest.raises(IndexError):
        rows.take(np.array([350]))
    only_labels = stream.rows(["labels"]).take(np.array([3, 1]))
    assert only_labels.equals(table.select(["labels"]).take(pa.array([3, 1])))

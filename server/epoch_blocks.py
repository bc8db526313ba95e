"""Per-block extremes of grad_norm_ratio, kept at ingest, so a downsampled read does not scan.

Downsampling cuts a run's epochs into aligned buckets of a power-of-two size s (bucket i holds
epochs i*s .. i*s+s-1) and keeps, per bucket, the epoch with the smallest and the epoch with the
largest ratio (the earlier one on ties), or the bucket's first epoch when no ratio in it is
comparable (all NULL or NaN; +/-Inf do compare, so an infinite ratio is a bucket's maximum).
`epoch_block` holds exactly that for every block of every size in BLOCK_SIZES; ingest merges
each batch in with an upsert. Blocks only ever gain epochs (a stored epoch is never changed,
a run is deleted whole), so merging extremes is exact: the stored row equals what a scan of the
block's epochs would choose, whatever order the epochs arrived in.

Aligned buckets also stay put while a live run grows: the buckets a page shows are not
re-cut by every new epoch, only the last one changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

# 16 .. 65,536 epochs: ~1/8 of a run's epoch count in rows. A read that needs smaller buckets
# (fewer than ~16 epochs per bucket: a short run) or larger ones scans the epochs instead.
MIN_BLOCK_SHIFT, MAX_BLOCK_SHIFT = 4, 16
BLOCK_SIZES = tuple(2**k for k in range(MIN_BLOCK_SHIFT, MAX_BLOCK_SHIFT + 1))

Extremes = tuple[int, Any, int | None, Any, int | None]
"""(first_epoch, min_ratio, min_ratio_epoch, max_ratio, max_ratio_epoch) over some epochs;
the last four are None when none of them has a comparable ratio."""

COLUMNS = ("run_id", "block_size", "block_index", "first_epoch", "min_ratio", "min_ratio_epoch",
           "max_ratio", "max_ratio_epoch")  # fmt: skip


def of_epoch(epoch: int, ratio: float | None) -> Extremes:
    if ratio is None or ratio != ratio:  # NULL or NaN: no place in the order
        return (epoch, None, None, None, None)
    return (epoch, ratio, epoch, ratio, epoch)


def merge(a: Extremes, b: Extremes) -> Extremes:
    """The extremes of two disjoint sets of epochs (ties go to the earlier epoch)."""
    first = a[0] if a[0] <= b[0] else b[0]
    if b[2] is None:
        low = a[1:3]
    elif a[2] is None or b[1] < a[1] or (b[1] == a[1] and b[2] < a[2]):
        low = b[1:3]
    else:
        low = a[1:3]
    if b[4] is None:
        high = a[3:5]
    elif a[4] is None or b[3] > a[3] or (b[3] == a[3] and b[4] < a[4]):
        high = b[3:5]
    else:
        high = a[3:5]
    return (first, *low, *high)


def _merge_into(blocks: dict[int, Extremes], index: int, x: Extremes) -> None:
    old = blocks.get(index)
    blocks[index] = x if old is None else merge(old, x)


def blocks_of(points: Iterable[tuple[int, float | None]]) -> dict[int, dict[int, Extremes]]:
    """{block size: {block index: extremes}} of these (epoch, ratio) pairs, at every size; each
    size is built from the one below (two children per block)."""
    level: dict[int, Extremes] = {}
    for epoch, ratio in points:
        _merge_into(level, epoch >> MIN_BLOCK_SHIFT, of_epoch(epoch, ratio))
    out = {BLOCK_SIZES[0]: level}
    for size in BLOCK_SIZES[1:]:
        parent: dict[int, Extremes] = {}
        for index, x in level.items():
            _merge_into(parent, index >> 1, x)
        out[size] = level = parent
    return out


def _wins(op: str, value: str, epoch: str) -> str:
    """SQL: the incoming row's extreme beats the stored one (see `merge`)."""
    new, old = f"excluded.{value}", f"epoch_block.{value}"
    new_e, old_e = f"excluded.{epoch}", f"epoch_block.{epoch}"
    return (f"({new_e} IS NOT NULL AND ({old_e} IS NULL OR {new} {op} {old} OR "
            f"({new} = {old} AND {new_e} < {old_e})))")  # fmt: skip


def _upsert_sql(mark: str) -> str:
    low = _wins("<", "min_ratio", "min_ratio_epoch")
    high = _wins(">", "max_ratio", "max_ratio_epoch")
    sets = [
        "first_epoch = CASE WHEN excluded.first_epoch < epoch_block.first_epoch "
        "THEN excluded.first_epoch ELSE epoch_block.first_epoch END"
    ]
    for won, column in ((low, "min_ratio"), (low, "min_ratio_epoch"),
                        (high, "max_ratio"), (high, "max_ratio_epoch")):  # fmt: skip
        # every SET expression sees the row as it was (both databases)
        kept = f"epoch_block.{column}"
        sets.append(f"{column} = CASE WHEN {won} THEN excluded.{column} ELSE {kept} END")
    return (f"INSERT INTO epoch_block ({', '.join(COLUMNS)}) VALUES "
            f"({', '.join([mark] * len(COLUMNS))}) ON CONFLICT (run_id, block_size, block_index) "
            f"DO UPDATE SET {', '.join(sets)}")  # fmt: skip


_UPSERT = {"?": _upsert_sql("?"), "%s": _upsert_sql("%s")}


def store(conn: sa.Connection, run_key: Any, points: Iterable[tuple[int, float | None]]) -> None:
    """Merge newly stored epochs' (epoch, ratio) into the run's blocks, in the caller's
    transaction (which holds the run's lock). `run_key`: the run id as the driver takes it."""
    rows = [(run_key, size, index, *x)
            for size, level in blocks_of(points).items() for index, x in level.items()]  # fmt: skip
    if rows:
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        conn.exec_driver_sql(_UPSERT[mark], rows)


def bucket_size(lo: int, hi: int, buckets: int) -> int:
    """The smallest power of two s such that epochs lo..hi span at most `buckets` aligned
    blocks of s epochs (so between buckets/2 and `buckets` of them, for a dense run)."""
    size = 1
    while hi // size - lo // size + 1 > buckets:
        size *= 2
    return size


def kept_in_blocks(rows: Iterable[tuple[int, int | None, int | None]]) -> set[int]:
    """The epochs downsampling keeps from `epoch_block` rows (first, min and max epochs)."""
    keep: set[int] = set()
    for first, low, high in rows:
        if low is None:
            keep.add(first)
        else:
            keep.add(low)
            keep.add(high)  # type: ignore[arg-type]
    return keep

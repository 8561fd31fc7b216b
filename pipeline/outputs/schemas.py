"""Parquet schemas of the pipeline's tables, and numpy batch -> Arrow column conversion."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# bookkeeping columns every sharded stage carries through (see pipeline.runtime.stages.KEEP)
ERRORS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("stage", pa.string()),  # "read", "decode", or the model stage's name
        ("reason", pa.string()),
    ]
)

POOLS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("label", pa.int64()),  # null when the source has no labels
        ("image_feature", pa.list_(pa.float16())),  # [d], L2-normalised
        ("s_min", pa.float32()),  # eq. 6: min over the whole vocabulary of s(I, k)
        ("s_max", pa.float32()),  # eq. 6: max over the whole vocabulary
        ("topk_ids", pa.list_(pa.int32())),  # [k] codebook rows, best first
        ("topk_scores", pa.list_(pa.float32())),  # [k] normalised scores of eq. 6, in [0, 1]
        ("n_above_min_threshold", pa.int32()),  # tokens of the top-K with score >= the lowest rho
        ("pool_truncated", pa.bool_()),  # n_above_min_threshold == k: more tokens may pass
    ]
)


def error_mask(errors: np.ndarray | list) -> np.ndarray:
    """bool ``[n]``: rows whose ``error`` holds a reason. None, "" and NaN (Ray's numpy view of an
    all-null column) mean no error."""
    return np.array([isinstance(e, str) and e != "" for e in errors], dtype=bool)


def to_arrow_column(values: np.ndarray | list, type_: pa.DataType) -> pa.Array:
    """A numpy batch column (as Ray Data hands it back) -> an Arrow array of ``type_``.

    Arrow arrays pass through (cast to ``type_``). Handles 2-D arrays for list types (``[n, k]``),
    object arrays of sequences/None (flattened once: ``_list_column``), integer columns that came back
    as float with NaN for null (Ray's numpy view of a nullable int), and string columns that came back
    as all-NaN floats (Ray's numpy view of a column of nulls only).
    """
    if isinstance(values, pa.Array | pa.ChunkedArray):  # built in Arrow already (e.g. the corpus's words)
        return values if values.type == type_ else values.cast(type_)
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        value_type = type_.value_type
        if isinstance(values, np.ndarray) and values.dtype != object and values.ndim == 2:
            n, k = values.shape
            flat = pa.array(values.reshape(-1).astype(value_type.to_pandas_dtype()), type=value_type)
            offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32), type=pa.int32())
            return pa.ListArray.from_arrays(offsets, flat).cast(type_)
        return _list_column(values, type_)
    if pa.types.is_integer(type_) and isinstance(values, np.ndarray) and values.dtype.kind == "f":
        mask = np.isnan(values)
        return pa.array(np.where(mask, 0, values).astype(type_.to_pandas_dtype()), type=type_, mask=mask)
    if (
        pa.types.is_string(type_)
        and isinstance(values, np.ndarray)
        and values.dtype.kind == "f"
        and np.isnan(values).all()
    ):
        return pa.nulls(len(values), type_)  # Ray's numpy view of an all-null string column (captions)
    if isinstance(values, np.ndarray) and values.dtype == object:
        values = values.tolist()
    return pa.array(values, type=type_)


def _list_column(values: np.ndarray | list, type_: pa.DataType) -> pa.Array:
    """Rows of sequences (lists, arrays; None for null) -> a list array, flattened once: one Arrow
    conversion of all the values instead of one per row (a corpus shard holds ~600 words a row)."""
    value_type = type_.value_type
    rows = list(values)
    nulls = np.fromiter((v is None for v in rows), dtype=bool, count=len(rows))
    lengths = np.fromiter((0 if v is None else len(v) for v in rows), dtype=np.int64, count=len(rows))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int64())
    present = [v for v in rows if v is not None and len(v)]
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        flat = pa.array(list(itertools.chain.from_iterable(present)), type=value_type)
    else:
        dtype = value_type.to_pandas_dtype()
        parts = [np.asarray(v).astype(dtype) for v in present]
        flat = pa.array(np.concatenate(parts) if parts else np.zeros(0, dtype), type=value_type)
    mask = pa.array(nulls) if nulls.any() else None
    return pa.LargeListArray.from_arrays(offsets, flat, mask=mask).cast(type_)


def take_rows(values: Any, rows: np.ndarray) -> Any:
    """The ``rows`` of a batch column: a numpy array (or sequence) or an Arrow array."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.take(pa.array(rows, type=pa.int64()))
    return np.asarray(values)[rows]


def concat_columns(parts: Sequence[Any]) -> Any:
    """Pieces of one batch column, in order -> one column (numpy, or Arrow when the pieces are)."""
    if isinstance(parts[0], pa.Array | pa.ChunkedArray):
        chunks = [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
        return pa.concat_arrays(chunks)
    return np.concatenate(parts)


def to_table(batch: Mapping[str, np.ndarray | list], schema: pa.Schema) -> pa.Table:
    """Select and convert the ``schema`` columns of a numpy batch; a missing column is an error."""
    missing = [name for name in schema.names if name not in batch]
    if missing:
        raise KeyError(
            f"batch lacks column(s) {', '.join(missing)} of the output schema; has {', '.join(batch)}"
        )
    arrays = [to_arrow_column(batch[f.name], f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)

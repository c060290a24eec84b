"""Scoring a Ray Data dataset with qalign: ``ds.map_batches`` with a class-based UDF on an actor pool,
so each actor loads the model once and scores many batches. The same code runs on a laptop
(``ray.init()``) and on a KubeRay cluster. Needs the extra: ``pip install .[ray]``. See
docs/SCALE-OUT.md."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

from . import Scorer, _batch_size, _is_array, _one_task

__all__ = ["score_dataset"]

#: The columns ``score_dataset`` adds.
COLUMNS = ("score", "probs", "std", "entropy", "level", "error")


def _schema() -> Any:
    """The added columns' Arrow types: fixed, so that every block (and every Parquet file written
    from one) has the same schema, whether its rows all failed, all passed, or some of each."""
    import pyarrow as pa

    return pa.schema(
        [
            ("score", pa.float64()),
            ("probs", pa.list_(pa.float64())),
            ("std", pa.float64()),
            ("entropy", pa.float64()),
            ("level", pa.string()),
            ("error", pa.string()),
        ]
    )


def _input(value: Any) -> Tuple[Any, Optional[str]]:
    """What the scorer gets for one cell, ``(input, None)``, or ``(None, why)`` when the cell holds
    nothing scorable: a missing value (None, NaN) must not become the path ``"None"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, f"no input: the value is missing ({value})"
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        return (path, None) if path else (None, "no input: the path is empty")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if _is_array(value):
        if value.ndim == 1 and str(value.dtype) == "uint8":  # encoded bytes as a numpy view
            return value.tobytes(), None
        return value, None  # pixels (e.g. `read_images`): the scorer checks the shape
    kind = type(value).__name__
    return None, f"cannot score a value of type {kind}: expected a path, encoded bytes or an H×W×3 uint8 array"


def _values(batch: Any, column: str) -> List[Any]:
    """One Python value per row of ``column``: str, bytes, a numpy array for tensor columns (such
    as ``read_images``' ``image``), None, or whatever else the column holds."""
    import pyarrow as pa

    data = batch.column(column)
    if isinstance(data.type, pa.BaseExtensionType):  # tensor types (Ray's or Arrow's): Ray converts them
        from ray.data.block import BlockAccessor

        return list(BlockAccessor.for_block(batch.select([column])).to_numpy(column))
    return data.to_pylist()


def _size_thread_pool() -> None:
    """Sizes the engine's thread pool to the CPUs Ray gave this actor. The pool (rayon) otherwise
    takes every core of the node, so N actors on one node would run N × cores threads. It is built
    on first use, so this runs before the model loads; a ``RAYON_NUM_THREADS`` already set wins."""
    if "RAYON_NUM_THREADS" in os.environ:
        return
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker, or a Ray without this API: leave the default
        return
    if cpus:
        os.environ["RAYON_NUM_THREADS"] = str(max(1, int(cpus)))


class _QAlignUDF:
    """One actor: one loaded model."""

    def __init__(self, model: str, column: str, task: str, batch_size: int, scorer_kwargs: Dict[str, Any]):
        _size_thread_pool()
        self.scorer = Scorer(model, **scorer_kwargs)
        self.column = column
        self.task = task
        self.batch_size = batch_size

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        if self.column not in batch.column_names:
            raise KeyError(f"the dataset has no column {self.column!r} (it has {sorted(batch.column_names)})")
        _check_free(batch.column_names)
        rows = len(batch)
        out: Dict[str, List[Any]] = {name: [None] * rows for name in COLUMNS}
        for name in ("score", "std", "entropy"):
            out[name] = [math.nan] * rows
        inputs: List[Any] = []
        where: List[int] = []
        for row, value in enumerate(_values(batch, self.column)):
            x, why = _input(value)
            if why is None:
                inputs.append(x)
                where.append(row)
            else:
                out["error"][row] = why
        # `Scorer.score` refuses an empty list; one task gives one record per input, in order.
        records: List[dict] = []
        if inputs:
            records = self.scorer.score(inputs, task=self.task, batch_size=self.batch_size, errors="return")
        for row, record in zip(where, records):
            if "error" in record:
                out["error"][row] = record["error"]
            else:
                probs = record["probs"]
                out["score"][row] = record["score"]
                out["probs"][row] = probs
                out["std"][row] = record["std"]
                out["entropy"][row] = record["entropy"]
                out["level"][row] = record["levels"][max(range(len(probs)), key=probs.__getitem__)]
        for field in _schema():
            batch = batch.append_column(field, pa.array(out[field.name], type=field.type))
        return batch


def _check_free(columns: Any) -> None:
    taken = sorted(set(COLUMNS) & set(columns))
    if taken:
        raise ValueError(f"the dataset already has the column(s) {taken} that score_dataset adds: rename or drop them")


def _pool(concurrency: Any) -> Any:
    """``concurrency`` (actors: a count, or ``(min, max)`` to autoscale) as Ray's
    ``ActorPoolStrategy``: the ``concurrency=`` argument of ``map_batches`` is deprecated since Ray
    2.51, and ``compute=`` works on every Ray this package supports (2.9 on)."""
    from ray.data import ActorPoolStrategy

    def count(n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"concurrency must be a positive actor count or a (min, max) pair of them, not {concurrency!r}"
            )
        return n

    if isinstance(concurrency, tuple) and len(concurrency) == 2:
        low, high = count(concurrency[0]), count(concurrency[1])
        if low > high:
            raise ValueError(f"concurrency {concurrency!r}: the minimum is above the maximum")
        return ActorPoolStrategy(min_size=low, max_size=high)
    return ActorPoolStrategy(size=count(concurrency))


def score_dataset(
    ds: Any,
    model: Union[str, "os.PathLike[str]"],
    column: str = "path",
    task: str = "quality",
    batch_size: int = 8,
    concurrency: Union[int, Tuple[int, int]] = 1,
    num_gpus: float = 0,
    num_cpus: Optional[float] = None,
    ray_remote_args: Optional[Dict[str, Any]] = None,
    **scorer_kwargs: Any,
) -> Any:
    """Adds ``score``, ``probs``, ``std``, ``entropy``, ``level`` and ``error`` columns to ``ds``.

    ``column`` holds paths (local or on a shared file system), encoded bytes (e.g. the ``bytes``
    column of ``ray.data.read_binary_files``) or decoded ``H×W×3`` ``uint8`` pixels (the ``image``
    column of ``ray.data.read_images``). ``concurrency`` actors (or ``(min, max)`` to autoscale)
    each load the model once (``num_gpus`` and ``num_cpus`` per actor, other Ray resources such as
    ``memory`` in ``ray_remote_args``; ``device="cuda"`` goes in ``scorer_kwargs``); an actor's
    engine runs as many threads as it has CPUs (unless ``RAYON_NUM_THREADS`` is set). A row that
    cannot be scored (also a missing value or a value of another type) gets its message in
    ``error`` (and NaN / None elsewhere) instead of failing the job. Lazy, as Ray Data is: write
    or iterate the result to run it.
    """
    task = _one_task(task)
    batch_size = _batch_size(batch_size)
    compute = _pool(concurrency)
    # Refused now when the schema is known without running anything, else by the first batch.
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        if column not in schema.names:
            raise KeyError(f"the dataset has no column {column!r} (it has {sorted(schema.names)})")
        _check_free(schema.names)
    # The named arguments win over the same keys in ray_remote_args (num_gpus only when set).
    remote_args = dict(ray_remote_args or {})
    if num_cpus is not None:
        remote_args["num_cpus"] = num_cpus
    if num_gpus or "num_gpus" not in remote_args:
        remote_args["num_gpus"] = num_gpus
    return ds.map_batches(
        _QAlignUDF,
        fn_constructor_kwargs={
            "model": os.fspath(model),
            "column": column,
            "task": task,
            "batch_size": batch_size,
            "scorer_kwargs": scorer_kwargs,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=compute,
        **remote_args,
    )

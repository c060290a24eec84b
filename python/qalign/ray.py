"""Scoring a Ray Data dataset with qalign: ``ds.map_batches`` with a class-based UDF, so each actor
loads the model once and scores many batches. The same code runs on a laptop (``ray.init()``) and on
a KubeRay cluster. Needs the extra: ``pip install .[ray]``. See docs/SCALE-OUT.md."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Union

from . import Scorer, _batch_size, _one_task

__all__ = ["score_dataset"]

#: The columns ``score_dataset`` adds.
COLUMNS = ("score", "probs", "std", "entropy", "level", "error")


class _QAlignUDF:
    """One actor: one loaded model."""

    def __init__(self, model: str, column: str, task: str, batch_size: int, scorer_kwargs: Dict[str, Any]):
        self.scorer = Scorer(model, **scorer_kwargs)
        self.column = column
        self.task = task
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        import numpy as np

        if self.column not in batch:
            raise KeyError(f"the dataset has no column {self.column!r} (it has {sorted(batch)})")
        _check_free(batch)
        inputs: List[Union[str, bytes]] = []
        for value in batch[self.column]:
            if isinstance(value, (bytes, bytearray, memoryview)):
                inputs.append(bytes(value))
            elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
                inputs.append(value.tobytes())
            else:
                inputs.append(os.fspath(str(value)))
        records = self.scorer.score(inputs, task=self.task, batch_size=self.batch_size, errors="return")
        out: Dict[str, list] = {name: [] for name in COLUMNS}
        for record in records:
            if "error" in record:
                out["score"].append(math.nan)
                out["probs"].append(None)
                out["std"].append(math.nan)
                out["entropy"].append(math.nan)
                out["level"].append(None)
                out["error"].append(record["error"])
            else:
                probs = record["probs"]
                out["score"].append(record["score"])
                out["probs"].append(probs)
                out["std"].append(record["std"])
                out["entropy"].append(record["entropy"])
                out["level"].append(record["levels"][max(range(len(probs)), key=probs.__getitem__)])
                out["error"].append(None)
        result = dict(batch)
        result["score"] = np.asarray(out["score"], dtype=np.float64)
        result["std"] = np.asarray(out["std"], dtype=np.float64)
        result["entropy"] = np.asarray(out["entropy"], dtype=np.float64)
        for name in ("probs", "level", "error"):
            column = np.empty(len(records), dtype=object)
            column[:] = out[name]
            result[name] = column
        return result


def _check_free(columns: Any) -> None:
    taken = sorted(set(COLUMNS) & set(columns))
    if taken:
        raise ValueError(f"the dataset already has the column(s) {taken} that score_dataset adds: rename or drop them")


def score_dataset(
    ds: Any,
    model: Union[str, "os.PathLike[str]"],
    column: str = "path",
    task: str = "quality",
    batch_size: int = 8,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: Optional[float] = None,
    ray_remote_args: Optional[Dict[str, Any]] = None,
    **scorer_kwargs: Any,
) -> Any:
    """Adds ``score``, ``probs``, ``std``, ``entropy``, ``level`` and ``error`` columns to ``ds``.

    ``column`` holds paths (local or on a shared file system) or encoded bytes (e.g. the
    ``bytes`` column of ``ray.data.read_binary_files``). ``concurrency`` actors each load the
    model once (``num_gpus`` and ``num_cpus`` per actor, other Ray resources such as ``memory`` in
    ``ray_remote_args``; ``device="cuda"`` goes in ``scorer_kwargs``). A row that
    cannot be scored gets its message in ``error`` (and NaN / None elsewhere) instead of failing
    the job. Lazy, as Ray Data is: write or iterate the result to run it.
    """
    task = _one_task(task)
    batch_size = _batch_size(batch_size)
    # Refused now when the schema is known without running anything, else by the first batch.
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
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
        batch_format="numpy",
        concurrency=concurrency,
        **remote_args,
    )

"""Q-Align / OneAlign scoring from Python, through qalign's Rust engine (no torch, no transformers).

>>> import qalign
>>> scorer = qalign.Scorer("q-future/one-align")            # or a model folder
>>> scorer.score(["a.jpg", "clip.mp4"], task="all")           # one dict per input and task

Each result dict has exactly the fields of ``qalign score --format json``. Inputs may be paths
(``str`` or ``os.PathLike``; videos are scored as videos), bytes of an encoded file, PIL images, or
numpy ``H×W×3`` ``uint8`` arrays.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

from ._qalign import QAlignError, __version__
from ._qalign import Scorer as _RustScorer

__all__ = ["Scorer", "QAlignError", "create_metric", "QAlignMetric", "__version__"]

TASKS = ("quality", "aesthetics", "all")
SCALES = ("1-5", "0-1")


def _tasks(task: Union[str, Sequence[str]]) -> List[str]:
    names = [task] if isinstance(task, str) else list(task)
    for name in names:
        if not isinstance(name, str) or name.lower() not in TASKS + ("aesthetic",):
            raise ValueError(f"unknown task {name!r}: expected quality, aesthetics or all")
    if not names:
        raise ValueError("no task given: expected quality, aesthetics or all")
    return names


def _is_array(x: Any) -> bool:
    return hasattr(x, "__array_interface__") and hasattr(x, "shape") and hasattr(x, "dtype")


def _is_pil(x: Any) -> bool:
    return hasattr(x, "convert") and hasattr(x, "size") and hasattr(x, "tobytes") and hasattr(x, "mode")


def _rgb_of_array(x: Any, name: str) -> Tuple[bytes, int, int]:
    shape = tuple(x.shape)
    if len(shape) != 3 or shape[2] != 3 or str(x.dtype) != "uint8":
        raise ValueError(f"{name}: expected an H×W×3 uint8 array, got shape {shape} and dtype {x.dtype}")
    height, width = shape[0], shape[1]
    data = x.tobytes(order="C")
    return data, width, height


def _rgb_of_pil(image: Any) -> Tuple[bytes, int, int]:
    rgb = image.convert("RGB")
    width, height = rgb.size
    return rgb.tobytes(), width, height


class Scorer:
    """A loaded OneAlign model.

    ``model`` is a folder or a Hugging Face hub id (resolved through the HF cache, as on the CLI);
    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``dtype`` ``"f32"``, ``"f16"`` or
    ``"bf16"``; ``quant`` ``None``, ``"q8_0"`` or ``"q4k"``; ``lora`` an adapter folder merged as the
    model loads. Loading errors raise :class:`QAlignError` with qalign's message.
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"],
        device: str = "cpu",
        dtype: str = "f32",
        quant: Optional[str] = None,
        lora: Optional[Union[str, "os.PathLike[str]"]] = None,
        offline: bool = False,
    ) -> None:
        self._inner = _RustScorer(
            os.fspath(model),
            device=device,
            dtype=dtype,
            quant=quant,
            lora=None if lora is None else os.fspath(lora),
            offline=offline,
        )

    @property
    def levels(self) -> List[str]:
        """The five level words, best first."""
        return list(self._inner.levels())

    def score(
        self,
        inputs: Any,
        task: Union[str, Sequence[str]] = "quality",
        scale: str = "1-5",
        batch_size: int = 8,
        errors: str = "raise",
    ) -> List[dict]:
        """Scores one input or a list of them; returns one dict per input and task, in order.

        With ``errors="raise"`` (the default) the first bad input raises :class:`QAlignError`
        naming it; with ``errors="return"`` it gets one dict ``{"path": ..., "error": ...}`` in its
        place and the others are still scored.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}: expected '1-5' or '0-1'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        tasks = _tasks(task)
        items = self._items(inputs)
        results: List[Optional[List[dict]]] = [None] * len(items)
        failures: List[Optional[str]] = [None] * len(items)
        paths = [(i, value) for i, (kind, value, _) in enumerate(items) if kind == "path"]
        if paths:
            outcomes = self._inner.score_paths([p for _, p in paths], tasks, scale, batch_size)
            for (i, _), (records, error) in zip(paths, outcomes):
                results[i], failures[i] = records, error
        for i, (kind, value, name) in enumerate(items):
            if kind == "bytes":
                results[i], failures[i] = self._inner.score_bytes(value, name, tasks, scale)
            elif kind == "rgb":
                data, width, height = value
                try:
                    results[i] = self._inner.score_rgb(data, (width, height), name, tasks, scale)
                except QAlignError as e:
                    failures[i] = str(e)
        out: List[dict] = []
        for i, (_, _, name) in enumerate(items):
            if failures[i] is not None:
                if errors == "raise":
                    raise QAlignError(failures[i])
                out.append({"path": name, "error": failures[i]})
            else:
                out.extend(json.loads(r) for r in results[i] or [])
        return out

    def _items(self, inputs: Any) -> List[Tuple[str, Any, str]]:
        single = isinstance(inputs, (str, bytes, bytearray, memoryview, os.PathLike)) or _is_array(inputs) or _is_pil(inputs)
        if single:
            inputs = [inputs]
        elif not isinstance(inputs, Iterable):
            raise TypeError(f"cannot score a {type(inputs).__name__}: give paths, bytes, PIL images or numpy arrays")
        items: List[Tuple[str, Any, str]] = []
        for i, x in enumerate(inputs):
            if isinstance(x, (str, os.PathLike)):
                path = os.fspath(x)
                items.append(("path", path, path))
            elif isinstance(x, (bytes, bytearray, memoryview)):
                items.append(("bytes", bytes(x), f"<bytes #{i}>"))
            elif _is_array(x):
                name = f"<array #{i}>"
                items.append(("rgb", _rgb_of_array(x, name), name))
            elif _is_pil(x):
                name = getattr(x, "filename", "") or f"<image #{i}>"
                items.append(("rgb", _rgb_of_pil(x), name))
            else:
                raise TypeError(
                    f"input #{i} is a {type(x).__name__}: give paths, bytes, PIL images or numpy arrays"
                )
        if not items:
            raise ValueError("no inputs given")
        return items


class QAlignMetric:
    """A pyiqa-style metric: ``metric(img_or_path_or_batch)`` returns the score on [1, 5] of one
    input (a float) or of each input of a list (a list of floats). Higher is better."""

    lower_better = False
    score_range = (1.0, 5.0)

    def __init__(self, scorer: Scorer, task: str, batch_size: int = 8) -> None:
        if task not in ("quality", "aesthetics", "aesthetic"):
            raise ValueError(f"unknown task {task!r}: expected quality or aesthetics")
        self.scorer = scorer
        self.task = task
        self.batch_size = batch_size

    def __call__(self, inputs: Any) -> Union[float, List[float]]:
        is_batch = isinstance(inputs, (list, tuple))
        records = self.scorer.score(inputs, task=self.task, scale="1-5", batch_size=self.batch_size)
        scores = [float(r["score"]) for r in records]
        return scores if is_batch else scores[0]


def create_metric(
    name: str = "qalign",
    task: str = "quality",
    model: Union[str, "os.PathLike[str]"] = "q-future/one-align",
    **scorer_kwargs: Any,
) -> QAlignMetric:
    """``qalign.create_metric("qalign")``: the drop-in for ``pyiqa.create_metric("qalign")``
    (``task="aesthetics"`` for ``qalign_aesthetic``). Extra keyword arguments go to :class:`Scorer`."""
    aliases = {"qalign": "quality", "qalign_aesthetic": "aesthetics", "qalign_aesthetics": "aesthetics"}
    if name not in aliases:
        raise ValueError(f"unknown metric {name!r}: expected one of {sorted(aliases)}")
    if name != "qalign":
        task = aliases[name]
    return QAlignMetric(Scorer(model, **scorer_kwargs), task)

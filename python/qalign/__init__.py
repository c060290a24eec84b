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
import operator
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ._qalign import QAlignError, __version__
from ._qalign import Scorer as _RustScorer

__all__ = ["Scorer", "QAlignError", "create_metric", "QAlignMetric", "__version__"]

TASKS = ("quality", "aesthetics", "all")
SCALES = ("1-5", "0-1")
#: Consecutive paths handed to the engine per call: enough to keep its batches full and its
#: decoder ahead, few enough that a long generator is read as it is scored.
PATH_RUN = 256

_Rgb = Tuple[bytes, int, int]
#: One record: the fields of ``qalign score --format json`` (or ``path`` and ``error``).
_Record = Dict[str, Any]


def _task_name(name: Any) -> str:
    """``name`` in lower case, ``aesthetic`` (pyiqa's spelling) read as ``aesthetics``."""
    if not isinstance(name, str):
        raise TypeError(f"a task is a name (quality, aesthetics or all), not a {type(name).__name__}")
    key = name.strip().lower()
    key = "aesthetics" if key == "aesthetic" else key
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected quality, aesthetics or all")
    return key


def _tasks(task: Union[str, Sequence[str]]) -> List[str]:
    if not isinstance(task, (str, Iterable)):
        raise TypeError(f"task must be a name or a list of names, not {type(task).__name__}")
    out: List[str] = []
    for name in [task] if isinstance(task, str) else task:
        key = _task_name(name)
        for one in ("quality", "aesthetics") if key == "all" else (key,):
            if one not in out:
                out.append(one)
    if not out:
        raise ValueError("no task given: expected quality, aesthetics or all")
    return out


def _one_task(task: str) -> str:
    key = _task_name(task)
    if key == "all":
        raise ValueError(f"unknown task {task!r}: expected quality or aesthetics (one task)")
    return key


def _batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool):
        raise TypeError("batch_size must be an integer, not a bool")
    try:
        n = operator.index(batch_size)
    except TypeError:
        raise TypeError(f"batch_size must be an integer, not {type(batch_size).__name__}") from None
    if n < 1:
        raise ValueError(f"batch_size must be a positive integer, not {n}")
    return n


def _is_array(x: Any) -> bool:
    # Test `_is_pil` first: a PIL image's `__array_interface__` decodes it (and may raise).
    return hasattr(x, "__array_interface__") and hasattr(x, "shape") and hasattr(x, "dtype")


def _is_pil(x: Any) -> bool:
    return hasattr(x, "convert") and hasattr(x, "size") and hasattr(x, "tobytes") and hasattr(x, "mode")


def _is_single(x: Any) -> bool:
    """One input, as opposed to an iterable of them."""
    return isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike)) or _is_pil(x) or _is_array(x)


def _rgb_of_array(x: Any) -> _Rgb:
    shape = tuple(x.shape)
    if len(shape) != 3 or shape[2] != 3 or str(x.dtype) != "uint8":
        raise ValueError(f"expected an H×W×3 uint8 array, got shape {shape} and dtype {x.dtype}")
    height, width = shape[0], shape[1]
    return x.tobytes(order="C"), width, height


def _rgb_of_pil(image: Any) -> _Rgb:
    rgb = image.convert("RGB")
    width, height = rgb.size
    return rgb.tobytes(), width, height


def _chained(message: str, cause: Exception) -> QAlignError:
    # Not built in the `except` block: a local there would make a cycle with the traceback,
    # keeping the bad input alive until the garbage collector runs.
    error = QAlignError(message)
    error.__cause__ = cause
    return error


def _records(name: str, records: List[str]) -> Iterator[_Record]:
    for text in records:
        record = json.loads(text)
        # The caller's own string: the engine's rendering of a path is lossy when not UTF-8.
        record["path"] = name
        yield record


class Scorer:
    """A loaded OneAlign model.

    ``model`` is a folder or a Hugging Face hub id (resolved through the HF cache, as on the CLI);
    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``dtype`` ``"f32"``, ``"f16"`` or
    ``"bf16"``; ``quant`` ``None``, ``"q8_0"`` or ``"q4k"``; ``lora`` an adapter folder merged as the
    model loads; ``offline=True`` never touches the network (``False`` defers to ``HF_HUB_OFFLINE``
    and ``TRANSFORMERS_OFFLINE``); ``revision`` a branch, tag or commit hash of a hub id (default
    ``main``). Loading errors raise :class:`QAlignError` with qalign's message.
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"],
        device: str = "cpu",
        dtype: str = "f32",
        quant: Optional[str] = None,
        lora: Optional[Union[str, "os.PathLike[str]"]] = None,
        offline: bool = False,
        revision: Optional[str] = None,
    ) -> None:
        self._inner = _RustScorer(
            os.fspath(model),
            device=device,
            dtype=dtype,
            quant=quant,
            lora=None if lora is None else os.fspath(lora),
            offline=offline,
            revision=revision,
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
    ) -> List[_Record]:
        """Scores one input or an iterable of them; returns one dict per input and task, in order.

        Inputs are read as they are scored (a generator of images is never held whole). With
        ``errors="raise"`` (the default) the first bad input raises :class:`QAlignError` naming it,
        before later inputs are scored; with ``errors="return"`` it gets one dict
        ``{"path": ..., "error": ...}`` in its place and the others are still scored.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}: expected '1-5' or '0-1'")
        batch_size = _batch_size(batch_size)
        tasks = _tasks(task)
        if _is_single(inputs):
            inputs = [inputs]
        elif not isinstance(inputs, Iterable):
            raise TypeError(f"cannot score a {type(inputs).__name__}: give paths, bytes, PIL images or numpy arrays")
        out: List[_Record] = []

        def add(name: str, records: Optional[List[str]], error: Optional[QAlignError]) -> None:
            if error is None:
                out.extend(_records(name, records or []))
            elif errors == "raise":
                raise error
            else:
                out.append({"path": name, "error": str(error)})

        run: List[str] = []

        def flush() -> None:
            if run:
                # `min`: a Python int may not fit the engine's usize, and no batch needs more.
                outcomes = self._inner.score_paths(
                    run, tasks, scale, min(batch_size, len(run)), stop_on_error=errors == "raise"
                )
                for name, (records, error) in zip(run, outcomes):
                    add(name, records, None if error is None else QAlignError(error))
                run.clear()

        count = 0
        for i, x in enumerate(inputs):
            count += 1
            if isinstance(x, (str, os.PathLike)):
                run.append(os.fsdecode(x))
                if len(run) >= max(PATH_RUN, batch_size):
                    flush()
            else:
                flush()
                add(*self._score_one(x, i, tasks, scale))
        flush()
        if not count:
            raise ValueError("no inputs given")
        return out

    def _score_one(
        self, x: Any, i: int, tasks: List[str], scale: str
    ) -> Tuple[str, Optional[List[str]], Optional[QAlignError]]:
        """Scores one input that is not a path: ``(name, records, error)``."""
        if isinstance(x, (bytes, bytearray, memoryview)):
            name = f"<bytes #{i}>"
            records, message = self._inner.score_bytes(
                x if isinstance(x, (bytes, bytearray)) else bytes(x), name, tasks, scale
            )
            return name, records, None if message is None else QAlignError(message)
        convert: Callable[[Any], _Rgb]
        if _is_pil(x):
            # A file name may be bytes or hold undecodable bytes (surrogates): the record keeps it
            # as Python spells it, Rust gets a UTF-8 rendering.
            filename = getattr(x, "filename", "")
            name, convert = os.fsdecode(filename) if filename else f"<image #{i}>", _rgb_of_pil
        elif _is_array(x):
            name, convert = f"<array #{i}>", _rgb_of_array
        else:
            raise TypeError(f"input #{i} is a {type(x).__name__}: give paths, bytes, PIL images or numpy arrays")
        try:
            data, width, height = convert(x)
            utf8 = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            return name, self._inner.score_rgb(data, (width, height), utf8, tasks, scale), None
        except QAlignError as e:
            return name, None, e
        except Exception as e:  # what numpy or Pillow say of a bad image (a truncated file, ...)
            return name, None, _chained(f"{name}: {e}", e)


class QAlignMetric:
    """A pyiqa-style metric: ``metric(img_or_path_or_batch)`` returns the score on [1, 5] of one
    input (a float) or of each input of a list or other iterable (a list of floats). Higher is
    better."""

    lower_better = False
    score_range = (1.0, 5.0)

    def __init__(self, scorer: Scorer, task: str, batch_size: int = 8) -> None:
        self.scorer = scorer
        self.task = _one_task(task)
        self.batch_size = _batch_size(batch_size)

    def __call__(self, inputs: Any) -> Union[float, List[float]]:
        records = self.scorer.score(inputs, task=self.task, scale="1-5", batch_size=self.batch_size)
        scores = [float(r["score"]) for r in records]
        return scores[0] if _is_single(inputs) else scores


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
    # Checked before the model loads (which takes long).
    task = _one_task(task if name == "qalign" else aliases[name])
    return QAlignMetric(Scorer(model, **scorer_kwargs), task)

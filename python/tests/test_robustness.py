"""The Python layer's promises beyond the numbers: Ctrl-C, fail-fast and per-item errors, lazy
reading of inputs, odd paths and batch sizes, picklable errors, the metric on any iterable, numpy and
Pillow optional."""

import concurrent.futures
import functools
import multiprocessing
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
from PIL import Image

import qalign

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-onealign"
JPEG = FIXTURES / "images" / "boy_colorful.jpg"
PNG = FIXTURES / "images" / "synth_landscape_300x200_rgb.png"
VIDEO = FIXTURES / "video" / "baby.mp4"


@pytest.fixture(scope="module")
def scorer():
    return qalign.Scorer(MODEL)


@pytest.fixture(scope="module")
def jpeg_score(scorer):
    return scorer.score(str(JPEG))[0]["score"]


def test_ctrl_c_stops_a_long_call(scorer):
    # Python's own handler: a process started in the background by a shell without job control
    # (`nohup pytest &`, some CI runners) inherits SIGINT ignored, and the call ran to its end.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            scorer.score([str(JPEG)] * 40, batch_size=1)  # ~1 s an image in a debug build
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 10


def test_errors_raise_stops_at_the_first_bad_input(scorer, tmp_path):
    rest = [str(JPEG)] * 30
    for first in (str(tmp_path / "missing.jpg"), b"junk"):
        start = time.monotonic()
        with pytest.raises(qalign.QAlignError, match="missing.jpg|<bytes #0>"):
            scorer.score([first, *rest], batch_size=1)
        assert time.monotonic() - start < 10, first


def test_huge_and_numpy_batch_sizes_and_task_lists(scorer, jpeg_score):
    for batch_size in (2**62, 10**12):
        [record] = scorer.score(str(JPEG), batch_size=batch_size)
        assert record["score"] == jpeg_score
    records = scorer.score(str(JPEG), task=["Quality", "all"], batch_size=np.int64(3))
    assert [r["task"] for r in records] == ["quality", "aesthetics"]
    assert records[0]["score"] == jpeg_score
    with pytest.raises(TypeError, match="bool"):
        scorer.score(str(JPEG), batch_size=True)
    with pytest.raises(ValueError, match="positive"):
        scorer.score(str(JPEG), batch_size=0)
    with pytest.raises(TypeError, match="task"):
        scorer.score(str(JPEG), task=None)


def test_inputs_are_read_as_scored_and_bad_pixels_are_per_item_errors(scorer, jpeg_score, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(JPEG.read_bytes()[:20_000])
    makers = [
        lambda: Image.open(JPEG),
        lambda: np.zeros((4, 4), np.uint8),
        lambda: Image.open(truncated),
        lambda: np.asarray(Image.open(JPEG).convert("RGB")),
    ]
    made, alive_when_asked = [], []

    def inputs():
        for make in makers:
            alive_when_asked.append(sum(ref() is not None for ref in made))
            x = make()
            made.append(weakref.ref(x))
            yield x
            del x

    out = scorer.score(inputs(), errors="return")
    # At most the input just scored is still held when the next one is read.
    assert max(alive_when_asked) <= 1, alive_when_asked
    assert [r["path"] for r in out] == [str(JPEG), "<array #1>", str(truncated), "<array #3>"]
    assert out[0]["score"] == out[3]["score"] == jpeg_score
    assert "H×W×3" in out[1]["error"] and "truncated" in out[2]["error"]
    with pytest.raises(qalign.QAlignError, match="truncated.jpg") as raised:
        scorer.score(Image.open(truncated))
    assert isinstance(raised.value.__cause__, OSError)
    # Pixels that pad to a 3-pixel square are refused, as the same image from a file is.
    with pytest.raises(qalign.QAlignError, match="3x3 square"):
        scorer.score(np.zeros((2, 3, 3), np.uint8))


def test_bytes_need_no_temporary_folder_except_for_videos(scorer, jpeg_score, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    out = scorer.score([JPEG.read_bytes(), VIDEO.read_bytes()], errors="return")
    assert out[0]["score"] == jpeg_score and out[0]["path"] == "<bytes #0>"
    assert out[1]["path"] == "<bytes #1>" and out[1]["error"].startswith("<bytes #1>: ")
    assert "qalign-py-" not in out[1]["error"]


def test_records_are_named_by_the_callers_path(scorer, jpeg_score, tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    try:
        shutil.copy(JPEG, raw)
    except OSError:
        pytest.skip("the file system refuses non-UTF-8 names")
    name, missing = os.fsdecode(raw), os.fsdecode(raw + b".missing")
    out = scorer.score([name, missing], errors="return")
    assert [r["path"] for r in out] == [name, missing]
    assert out[0]["score"] == jpeg_score and "error" in out[1]
    # So are PIL images opened from such a name, as str or as bytes.
    out = scorer.score([Image.open(name), Image.open(raw)])
    assert [r["path"] for r in out] == [name, name]
    assert out[0]["score"] == out[1]["score"] == jpeg_score


def test_errors_pickle_and_cross_processes(tmp_path):
    error = pickle.loads(pickle.dumps(qalign.QAlignError("boom")))
    assert type(error) is qalign.QAlignError and str(error) == "boom"
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        future = pool.submit(functools.partial(qalign.Scorer, str(tmp_path / "no-model")))
        with pytest.raises(qalign.QAlignError, match="no-model"):
            future.result()


def test_metric_takes_any_iterable_and_checks_its_task_first(tmp_path, jpeg_score):
    metric = qalign.create_metric("qalign", model=MODEL)
    assert metric(p for p in [str(JPEG), str(JPEG)]) == [jpeg_score, jpeg_score]
    nowhere = tmp_path / "no-model"
    with pytest.raises(ValueError, match="task"):
        qalign.create_metric("qalign", task="all", model=nowhere)
    with pytest.raises(qalign.QAlignError):  # the task is fine: only then does loading fail
        qalign.create_metric("qalign", task="Aesthetics", model=nowhere)


@pytest.mark.parametrize("missing", [("numpy",), ("PIL",)])
def test_numpy_and_pillow_are_optional(jpeg_score, missing, tmp_path):
    """Without numpy or Pillow (neither is a dependency), `import qalign` works, paths and bytes
    score, and the other library's inputs still do."""
    pixels = tmp_path / "pixels.npy"
    np.save(pixels, np.asarray(Image.open(JPEG).convert("RGB")))
    code = f"""
import sys
for name in {missing!r}:
    sys.modules[name] = None  # `import` raises ImportError, as when it is not installed
import qalign
import pathlib
inputs = [{str(JPEG)!r}, pathlib.Path({str(JPEG)!r}).read_bytes()]
if "PIL" not in {missing!r}:
    from PIL import Image
    inputs.append(Image.open({str(JPEG)!r}))
if "numpy" not in {missing!r}:
    import numpy
    inputs.append(numpy.load({str(pixels)!r}))
for record in qalign.Scorer({str(MODEL)!r}).score(inputs):
    print(repr(record["score"]))
"""
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = [float(line) for line in out.stdout.split()]
    assert scores == [jpeg_score] * 3

"""`qalign.ray.score_dataset` on a local Ray instance: the same numbers as `Scorer`, from paths and
from `read_binary_files` bytes, with a bad row turned into an `error` value."""

import math
import pathlib

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install .[ray])")

import qalign  # noqa: E402
from qalign.ray import score_dataset  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "tiny-onealign"
IMAGES = sorted((ROOT / "tests" / "fixtures" / "images").iterdir())


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_paths_and_bytes_match_the_scorer_and_bad_rows_get_an_error(local_ray, tmp_path):
    scorer = qalign.Scorer(MODEL)
    want = {str(p): r["score"] for p, r in zip(IMAGES, scorer.score([str(p) for p in IMAGES]))}
    missing = str(tmp_path / "missing.jpg")
    ds = ray.data.from_items([{"path": str(p)} for p in IMAGES] + [{"path": missing}])
    rows = score_dataset(ds, MODEL, batch_size=4, num_cpus=1).take_all()
    assert len(rows) == len(IMAGES) + 1
    for row in rows:
        if row["path"] == missing:
            assert "missing.jpg" in row["error"]
            assert math.isnan(row["score"])
        else:
            assert row["error"] is None
            assert row["score"] == want[row["path"]]
            assert len(row["probs"]) == 5
            assert row["level"] in scorer.levels

    files = ray.data.read_binary_files([str(p) for p in IMAGES], include_paths=True)
    rows = score_dataset(files, MODEL, column="bytes", ray_remote_args={"num_cpus": 1}).take_all()
    assert len(rows) == len(IMAGES)
    for row in rows:
        assert row["error"] is None
        name = pathlib.Path(row["path"]).name
        [expected] = [v for k, v in want.items() if pathlib.Path(k).name == name]
        assert abs(row["score"] - expected) <= 1e-12


def test_one_task_only():
    with pytest.raises(ValueError, match="one task"):
        score_dataset(None, MODEL, task="all")


def test_existing_output_columns_are_refused(local_ray):
    ds = ray.data.from_items([{"path": str(IMAGES[0]), "score": 1.0}])
    with pytest.raises(ValueError, match="score"):
        score_dataset(ds, MODEL)

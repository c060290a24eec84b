"""`qalign.ray.score_dataset` on a local Ray instance: the same numbers as `Scorer`, from paths,
from `read_binary_files` bytes and from `read_images` pixels; a bad row (or a missing value) turned
into an `error` value; one Arrow schema for every block; one engine thread per actor CPU."""

import math
import os
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


def test_missing_and_odd_values_are_row_errors_and_every_block_has_one_schema(local_ray, tmp_path):
    # A missing value was read as the path "None": a file of that name in a worker's directory
    # was scored in its place, with no error.
    good = str(IMAGES[0])
    want = qalign.Scorer(MODEL).score(good)[0]["score"]
    ds = ray.data.from_items([{"path": p, "id": i} for i, p in enumerate([None, "", None, good, good])])
    # Batches of 2: the first holds errors only, the last is clean; each becomes a block.
    scored = score_dataset(ds, MODEL, batch_size=2, concurrency=(1, 2))
    out = tmp_path / "scores"
    scored.write_parquet(str(out))

    import pyarrow as pa
    import pyarrow.parquet as pq

    # Blocks with no error (or no score) wrote `null` columns, which pyarrow and pandas cannot
    # read beside the others ("Unsupported cast from string to null").
    table = pq.read_table(str(out))
    assert table.schema.field("error").type == pa.string()
    assert table.schema.field("level").type == pa.string()
    assert table.schema.field("probs").type == pa.list_(pa.float64())
    assert table.schema.field("score").type == pa.float64()
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    assert [r["error"] for r in rows] == [
        "no input: the value is missing (None)",
        "no input: the path is empty",
        "no input: the value is missing (None)",
        None,
        None,
    ]
    assert all(math.isnan(r["score"]) and r["probs"] is None and r["level"] is None for r in rows[:3])
    assert [r["score"] for r in rows[3:]] == [want, want]

    numbers = ray.data.from_items([{"path": 1.5}, {"path": float("nan")}])
    errors = sorted(r["error"] for r in score_dataset(numbers, MODEL).take_all())
    assert errors == [
        "cannot score a value of type float: expected a path, encoded bytes or an H×W×3 uint8 array",
        "no input: the value is missing (nan)",
    ]


def test_read_images_pixels_are_scored(local_ray):
    # The `image` column of read_images (H×W×3 arrays) was turned into a path spelled as the
    # array's repr: every row failed with "File name too long".
    paths = [str(p) for p in IMAGES[:2]]
    want = {pathlib.Path(r["path"]).name: r["score"] for r in qalign.Scorer(MODEL).score(paths)}
    ds = ray.data.read_images(paths, include_paths=True, mode="RGB")
    rows = score_dataset(ds, MODEL, column="image").take_all()
    assert len(rows) == 2
    for row in rows:
        assert row["error"] is None
        assert abs(row["score"] - want[pathlib.Path(row["path"]).name]) <= 1e-9


def test_a_missing_column_and_a_bad_actor_count_are_refused_at_once(local_ray):
    ds = ray.data.from_items([{"file": str(IMAGES[0])}])
    with pytest.raises(KeyError, match="no column 'path'"):
        score_dataset(ds, MODEL)
    for concurrency in (0, (2, 1), 1.5, True):
        with pytest.raises(ValueError, match="concurrency"):
            score_dataset(ds, MODEL, column="file", concurrency=concurrency)


def test_an_actor_runs_as_many_engine_threads_as_its_cpus(local_ray):
    # The engine's thread pool took every core of the node whatever `num_cpus` said, so N actors
    # on a node ran N × cores threads.
    from qalign.ray import _QAlignUDF

    @ray.remote(num_cpus=1)
    class Actor:
        def threads(self):
            os.environ.pop("RAYON_NUM_THREADS", None)  # as if the driver had not set it
            _QAlignUDF(str(MODEL), "path", "quality", 1, {})
            return os.environ.get("RAYON_NUM_THREADS")

    actor = Actor.remote()
    try:
        assert ray.get(actor.threads.remote()) == "1"
    finally:
        ray.kill(actor)

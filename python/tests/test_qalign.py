"""The Python package against the golden fixtures (the official PyTorch code's scores on the tiny
model), for every input kind; bad inputs; the pyiqa-style metric; the type stubs against the extension."""

import ast
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

import qalign

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "tiny-onealign"
IMAGES = sorted((FIXTURES / "images").iterdir())
EXPECTED = json.loads((FIXTURES / "expected" / "expected.json").read_text())
# The fixtures README's tolerances for the 1-5 score and the level logits (f32 on the CPU).
SCORE_TOL = 8e-6
LOGIT_TOL = 1e-5
FIELDS = {"path", "task", "input", "score", "scale", "levels", "probs", "logits", "std", "entropy"}


@pytest.fixture(scope="module")
def scorer():
    return qalign.Scorer(MODEL)


def expected(image: pathlib.Path, task: str) -> dict:
    return EXPECTED["images"][image.name]["tasks"][task]


def check(record: dict, image: pathlib.Path, task: str) -> None:
    assert FIELDS <= set(record), record
    assert record["task"] == task
    assert record["input"] == "image"
    want = expected(image, task)
    assert abs(record["score"] - want["score15"]) <= SCORE_TOL, (record["score"], want["score15"])
    for got, ref in zip(record["logits"], want["level_logits"]):
        assert abs(got - ref) <= LOGIT_TOL
    assert abs(sum(record["probs"]) - 1) < 1e-9


def test_paths_match_the_fixtures_for_both_tasks(scorer):
    records = scorer.score([str(p) for p in IMAGES], task="all")
    assert len(records) == 2 * len(IMAGES)
    for i, image in enumerate(IMAGES):
        check(records[2 * i], image, "quality")
        check(records[2 * i + 1], image, "aesthetics")
        assert records[2 * i]["path"] == str(image)
    # PathLike and a single input work too.
    assert scorer.score(IMAGES[0])[0]["score"] == records[0]["score"]


def test_bytes_pil_and_numpy_match_the_fixtures(scorer):
    for image in IMAGES:
        data = image.read_bytes()
        [from_bytes] = scorer.score(data)
        check(from_bytes, image, "quality")
        assert from_bytes["path"] == "<bytes #0>"
        # Decoded by Pillow (the official loader): the same pixels as qalign's own decoder.
        pil = Image.open(image)
        [from_pil] = scorer.score(pil)
        check(from_pil, image, "quality")
        array = np.asarray(Image.open(image).convert("RGB"))
        [from_array] = scorer.score(array)
        check(from_array, image, "quality")


def test_scale_and_batching(scorer):
    a = scorer.score([str(p) for p in IMAGES], batch_size=1)
    b = scorer.score([str(p) for p in IMAGES], batch_size=8, scale="0-1")
    for x, y in zip(a, b):
        assert y["scale"] == "0-1"
        assert abs((x["score"] - 1) / 4 - y["score"]) < 1e-9


def test_bad_inputs_raise_clear_errors(scorer, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(qalign.QAlignError, match="broken.jpg"):
        scorer.score([str(IMAGES[0]), str(bad)])
    with pytest.raises(qalign.QAlignError):
        scorer.score(str(tmp_path / "missing.png"))
    with pytest.raises(qalign.QAlignError, match="<bytes #0>"):
        scorer.score(b"garbage bytes")
    with pytest.raises(qalign.QAlignError, match="H×W×3 uint8") as bad_array:
        scorer.score(np.zeros((4, 4), dtype=np.uint8))
    assert isinstance(bad_array.value.__cause__, ValueError)
    with pytest.raises(ValueError, match="unknown task"):
        scorer.score(str(IMAGES[0]), task="sharpness")
    with pytest.raises(ValueError, match="scale"):
        scorer.score(str(IMAGES[0]), scale="1-10")
    with pytest.raises(TypeError, match="int"):
        scorer.score([3])
    with pytest.raises(ValueError, match="no inputs"):
        scorer.score([])
    with pytest.raises(qalign.QAlignError):
        qalign.Scorer(tmp_path)
    with pytest.raises(qalign.QAlignError, match="device"):
        qalign.Scorer(MODEL, device="tpu")


def test_errors_can_be_returned_per_item(scorer, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = scorer.score([str(IMAGES[0]), str(bad), b"nope", str(IMAGES[1])], errors="return")
    assert [("error" in r) for r in out] == [False, True, True, False]
    assert out[1]["path"] == str(bad) and "broken.png" in out[1]["error"]
    check(out[0], IMAGES[0], "quality")
    check(out[3], IMAGES[1], "quality")


def test_pyiqa_style_metric():
    metric = qalign.create_metric("qalign", model=MODEL)
    assert metric.lower_better is False
    assert metric.score_range == (1.0, 5.0)
    one = metric(str(IMAGES[0]))
    assert isinstance(one, float)
    assert abs(one - expected(IMAGES[0], "quality")["score15"]) <= SCORE_TOL
    many = metric([str(p) for p in IMAGES[:2]])
    assert len(many) == 2 and many[0] == one
    aesthetic = qalign.create_metric("qalign_aesthetic", model=MODEL)
    assert abs(aesthetic(str(IMAGES[0])) - expected(IMAGES[0], "aesthetics")["score15"]) <= SCORE_TOL
    with pytest.raises(ValueError):
        qalign.create_metric("niqe")


def test_records_equal_the_cli_json(scorer):
    """The same records as `qalign score --format json`, field for field (when the binary is built)."""
    import os
    import subprocess

    binary = pathlib.Path(os.environ.get("QALIGN_BIN", ROOT / "target" / "debug" / "qalign"))
    if not binary.is_file():
        pytest.skip(f"no qalign binary at {binary} (build it with cargo, or set QALIGN_BIN)")
    paths = [str(p) for p in IMAGES]
    cli = subprocess.run(
        [str(binary), "-q", "score", "--model", str(MODEL), "--task", "all", "--format", "json", *paths],
        check=True,
        capture_output=True,
        text=True,
    )
    assert scorer.score(paths, task="all") == json.loads(cli.stdout)


def test_hub_revision_and_offline_from_the_environment(tmp_path, monkeypatch):
    # A tagged snapshot in a Hugging Face cache, as huggingface_hub lays it out.
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in MODEL.iterdir():
        (snapshot / path.name).symlink_to(path)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # offline=False (the default) leaves the choice to HF_HUB_OFFLINE: nothing goes to the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = FIXTURES / "images" / "boy_colorful.jpg"
    record = qalign.Scorer("org/tiny", revision="v1").score(image)[0]
    check(record, image, "quality")
    with pytest.raises(qalign.QAlignError, match="offline mode is on"):
        qalign.Scorer("org/tiny")  # `main` is not cached
    with pytest.raises(qalign.QAlignError, match="applies to a hub id"):
        qalign.Scorer(MODEL, revision="v1")


def _parameters(function: ast.FunctionDef) -> list:
    """``(name, default)`` of each parameter after self / cls; no default is ``...``."""
    args = function.args.args[1:]
    defaults = [...] * (len(args) - len(function.args.defaults))
    return [(a.arg, d) for a, d in zip(args, defaults + [ast.literal_eval(x) for x in function.args.defaults])]


def test_type_stubs_match_the_extension():
    """Every function of `_qalign.pyi` has the runtime's parameter names and defaults (what
    mypy's stubtest checks, without needing mypy), and the stubs name every public method."""
    from qalign import _qalign

    stub = ast.parse(pathlib.Path(_qalign.__file__).with_name("_qalign.pyi").read_text())
    [all_names] = [
        ast.literal_eval(n.value)
        for n in stub.body
        if isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["__all__"]
    ]
    assert all_names == _qalign.__all__
    [cls] = [n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Scorer"]
    defs = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
    public = {name for name in dir(_qalign.Scorer) if not name.startswith("_")}
    assert public == {d.name for d in defs if not d.name.startswith("_")}
    for d in defs:
        # A PyO3 class is built by `__new__` (its `#[new]`), whose signature is the class's
        # (absent under Python 3.9's limited API); its `__init__` is object's.
        runtime = _qalign.Scorer if d.name == "__new__" else getattr(_qalign.Scorer, d.name)
        text = runtime.__text_signature__
        if text is None and d.name == "__new__" and sys.version_info < (3, 10):
            continue
        [parsed] = ast.parse(f"def f{text.replace('$self', 'self')}: pass").body
        if d.name == "__new__":
            parsed.args.args.insert(0, ast.arg("cls"))
        assert _parameters(d) == _parameters(parsed), d.name


def test_package_metadata_matches_what_was_checked():
    """The installed metadata: Python 3.9 on (the abi3 floor), nothing needed at run time (numpy
    and Pillow are optional), and a Ray extra that imports: Ray 2.22 on (older Ray Data fails with
    pyarrow 21+), plus typing-extensions, which Ray Data imports without declaring it."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    meta = metadata.metadata("qalign")
    assert SpecifierSet(meta["Requires-Python"]) == SpecifierSet(">=3.9")
    requires = [Requirement(r) for r in metadata.requires("qalign") or []]
    assert all(r.marker is not None and "extra" in str(r.marker) for r in requires), requires
    ray = {r.name: r.specifier for r in requires if r.marker.evaluate({"extra": "ray"})}
    assert ray == {"ray": SpecifierSet(">=2.22"), "typing-extensions": SpecifierSet(">=4.4")}

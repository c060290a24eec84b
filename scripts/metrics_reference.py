#!/usr/bin/env python3
"""Recompute the scipy reference values that qalign's metric tests compare against.

The tests (crates/qalign-core/tests/metrics.rs, tests/syllabus.rs, tests/eval.rs and
crates/qalign-cli/tests/cli_eval.rs) hold numbers from scipy's `spearmanr`, `pearsonr`,
`kendalltau` (tau-b) and `curve_fit` on the label fixtures in tests/fixtures/labels, under the
same deterministic transforms the tests apply. This script makes them again.

    python3 scripts/metrics_reference.py            # print every value as JSON
    python3 scripts/metrics_reference.py --check    # compare with the values in the tests

Needs numpy and scipy (the values in the tests came from scipy 1.17.1 / numpy 2.4):
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install numpy scipy
`--check` exits 1 if a value differs from the one in the tests by more than that test's
tolerance.
"""

import argparse
import json
import math
import pathlib
import sys

import numpy as np
from scipy import optimize, stats

LABELS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "labels"
ITU_WORDS_WORST_FIRST = ["bad", "poor", "fair", "good", "excellent"]


def mos(name):
    """The MOS of each record, read as qalign reads labels: `gt_score`, `mos` or `score`, else
    the number after "->" in `id`."""
    records = json.loads((LABELS / name).read_text())
    out = []
    for r in records:
        for key in ("gt_score", "mos", "score"):
            if key in r:
                out.append(float(r[key]))
                break
        else:
            out.append(float(r["id"].rsplit("->", 1)[1]))
    return np.array(out, dtype=np.float64)


def answer_levels(name):
    """Level number 1 (bad) ..= 5 (excellent) of each record's official answer sentence."""
    records = json.loads((LABELS / name).read_text())
    levels = []
    for r in records:
        answer = next(t["value"] for t in r["conversations"] if t["from"] == "gpt")
        word = answer.strip().removesuffix(".").rsplit(" is ", 1)[1].strip()
        levels.append(ITU_WORDS_WORST_FIRST.index(word) + 1)
    return np.array(levels, dtype=np.float64)


def four_metrics(x, y):
    return [
        float(stats.spearmanr(x, y).statistic),
        float(stats.pearsonr(x, y).statistic),
        float(stats.kendalltau(x, y).statistic),  # tau-b, scipy's default
        float(np.sqrt(np.mean((x - y) ** 2))),
    ]


def eq1_levels(scores, n=5):
    """Paper Eq. 1 over the scores' own range, as qalign's LevelSet::edge evaluates it:
    level i when m + (i-1)(M-m)/n < s <= m + i(M-m)/n; the minimum is level 1."""
    m, big_m = float(np.min(scores)), float(np.max(scores))
    edges = [m + i * (big_m - m) / n for i in range(1, n)]
    out = []
    for s in scores:
        level = next((i + 1 for i, e in enumerate(edges) if s <= e), n)
        out.append(level)
    return np.array(out, dtype=np.float64)


def logistic_4params(x, beta1, beta2, beta3, beta4):
    """pyiqa's `logistic_4params`."""
    return (beta1 - beta2) / (1 + np.exp(-(x - beta3) / np.abs(beta4))) + beta2


def compute():
    ref = {}
    # tests/metrics.rs: koniq_mos_against_official_levels.
    ref["koniq_mos_vs_official_levels"] = four_metrics(
        mos("train_koniq.json"), answer_levels("train_koniq.json")
    )
    # livec_mos_against_shifted_mos (and tests/eval.rs, pred and MOS swapped).
    livec = mos("livec.json")
    shift = np.array([((i * 37) % 101) * 0.5 for i in range(len(livec))])
    ref["livec_mos_vs_shifted"] = four_metrics(livec, livec + shift)
    # csiq_ties_on_both_sides.
    csiq = mos("csiq.json")
    ref["csiq_ties"] = four_metrics(
        csiq, np.array([float((i * 37) % 11) for i in range(len(csiq))])
    )
    # kadid_negative_correlation.
    kadid = mos("test_kadid.json")
    ref["kadid_negative"] = four_metrics(
        kadid, np.array([-(v * v) + (i % 7) * 0.25 for i, v in enumerate(kadid)])
    )
    # average_ranks_match_scipy_rankdata.
    ref["rankdata"] = stats.rankdata([10.0, 20.0, 10.0, 30.0, 20.0, 10.0]).tolist()
    # logistic_fit_matches_scipy_curve_fit: curve_fit from pyiqa's start, run to convergence.
    y = livec
    x = np.array(
        [math.log(v / (100.0 - v)) + ((i * 37) % 101) * 0.01 for i, v in enumerate(y)]
    )
    p0 = [np.max(y), np.min(y), np.mean(x), np.std(x) / 4]
    popt, _ = optimize.curve_fit(
        logistic_4params, x, y, p0=p0, maxfev=100000, ftol=1e-15, xtol=1e-15, gtol=1e-15
    )
    fitted = logistic_4params(x, *popt)
    ref["logistic_livec"] = {
        "popt": popt.tolist(),
        "sse": float(np.sum((y - fitted) ** 2)),
        "fitted_plcc": float(stats.pearsonr(fitted, y).statistic),
        "fitted_rmse": float(np.sqrt(np.mean((fitted - y) ** 2))),
        "raw_plcc": float(stats.pearsonr(x, y).statistic),
    }
    # tests/syllabus.rs: conversion precision (MOS vs Eq. 1 level) of KonIQ and SPAQ.
    for name in ("train_koniq.json", "train_spaq.json"):
        s = mos(name)
        levels = eq1_levels(s)
        ref[f"conversion_{name.removesuffix('.json')}"] = [
            float(stats.spearmanr(s, levels).statistic),
            float(stats.pearsonr(s, levels).statistic),
        ]
    # crates/qalign-cli/tests/cli_eval.rs: livec without its last 4 items (1165 pairs).
    ref["cli_livec_1165"] = four_metrics(livec[:-4] + shift[:-4], livec[:-4])
    return ref


# The values in the tests, with each test's tolerance.
IN_TESTS = {
    "koniq_mos_vs_official_levels": (
        [0.951690227341178, 0.9605520609333121, 0.844239402053305, 56.77831790535728],
        1e-9,
    ),
    "livec_mos_vs_shifted": (
        [0.7837840852667397, 0.8147046424909985, 0.5832343381285585, 28.937094394447357],
        1e-9,
    ),
    "csiq_ties": (
        [-0.011885253676209753, -0.014293583688868383, -0.008569584246349918, 5.63965515340551],
        1e-9,
    ),
    "kadid_negative": (
        [-0.9956538060149147, -0.9858601970357824, -0.9461350021119658, 14.731912474433521],
        1e-9,
    ),
    "rankdata": ([2.0, 4.5, 2.0, 6.0, 4.5, 2.0], 0.0),
    "logistic_livec.popt": (
        [96.24190808680181, -2.5755361931191034, 0.2986125246117232, 1.0982677419918954],
        1e-5,  # relative (× max(|β|, 1)) in the test
    ),
    "logistic_livec.sse": ([39939.1790612776], 1e-6),
    "logistic_livec.fitted_plcc": ([0.9575575839022197], 1e-9),
    "logistic_livec.fitted_rmse": ([5.845104922020203], 1e-9),
    "logistic_livec.raw_plcc": ([0.9513760805519967], 1e-9),
    "conversion_train_koniq": ([0.9519743722355466, 0.9607837262707731], 1e-9),
    "conversion_train_spaq": ([0.9701606089358322, 0.969471057923114], 1e-9),
    "cli_livec_1165": (
        [0.7830676762705022, 0.8145151514226114, 0.5825992180252408, 28.923396680481368],
        1e-9,
    ),
}


def lookup(ref, key):
    value = ref
    for part in key.split("."):
        value = value[part]
    return value if isinstance(value, list) else [value]


def check(ref):
    bad = 0
    for key, (expected, tol) in IN_TESTS.items():
        got = lookup(ref, key)
        for g, e in zip(got, expected, strict=True):
            limit = tol * max(abs(e), 1.0) if key.endswith("popt") else tol
            ok = abs(g - e) <= limit
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {key}: scipy {g!r}, test {e!r}")
    print(f"{bad} mismatch(es)")
    return bad == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the values in the tests")
    args = parser.parse_args()
    ref = compute()
    if args.check:
        sys.exit(0 if check(ref) else 1)
    print(json.dumps(ref, indent=2))


if __name__ == "__main__":
    main()

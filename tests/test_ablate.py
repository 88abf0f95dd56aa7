"""bench/ablate.py's statistics: per-row mean ± std, paired per-seed differences, and the rule that claims an
ordering only where the mean paired difference exceeds its spread."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import ablate  # noqa: E402


def _ssl(end: float, rare: float) -> dict:
    return {"supervised": {"AP": 50.0, "AP50": 70.0, "AP_per_class": {"r": 1.0}},
            "teacher": {"AP": end, "AP50": end + 20, "AP_per_class": {"r": rare}}}


def _sup(end: float, rare: float) -> dict:
    return {"supervised": {"AP": end, "AP50": end + 20, "AP_per_class": {"r": rare}}, "teacher": None}


RESULTS = {  # three seeds; seed 1's burn-in is the weak one, and every row of that seed is lower
    "sup": [_sup(60, 10), _sup(50, 8), _sup(58, 12)],
    "mt": [_ssl(63, 11), _ssl(53, 9), _ssl(62, 12)],  # +3, +3, +4 over sup: small but paired
    "affr": [_ssl(64, 20), _ssl(53, 9), _ssl(61, 30)],  # +1, 0, -1 over mt: nothing
}


def test_paired_differences_resolve_what_unpaired_spread_hides():
    mt, sup = ablate.row_values(RESULTS["mt"], ["r"]), ablate.row_values(RESULTS["sup"], ["r"])
    assert ablate.mean_std(mt["AP"]) == pytest.approx((59.3333, 5.5076), abs=1e-4)  # unpaired: 5.5 AP of spread
    m, s, d = ablate.paired(mt["AP"], sup["AP"])
    assert d == [3.0, 3.0, 4.0] and m == pytest.approx(10 / 3) and s == pytest.approx(0.57735, abs=1e-5)
    assert ablate.verdict(m, s, 3) == "higher"


def test_rule_claims_orderings_only_beyond_the_spread():
    assert ablate.verdict(0.0, 1.0, 3) == "within the spread"
    assert ablate.verdict(-2.0, 1.0, 3) == "lower"
    assert ablate.verdict(1.0, 1.0, 3) == "within the spread"  # equal is not beyond
    assert ablate.verdict(5.0, 0.0, 1) == "too few seeds"
    with pytest.raises(ValueError):
        ablate.paired([1.0, 2.0], [1.0])


def test_comparisons_against_supervised_and_mean_teacher():
    got = {(row, base, metric): (m, s, d) for row, base, metric, m, s, d in ablate.comparisons(RESULTS, ["r"])}
    assert set(got) == {(r, "sup", k) for r in ("mt", "affr") for k in ("AP", "r")} | {("affr", "mt", "AP"),
                                                                                         ("affr", "mt", "r")}
    m, s, d = got[("affr", "mt", "AP")]
    assert d == [1.0, 0.0, -1.0] and m == pytest.approx(0.0) and s == pytest.approx(1.0)
    m, s, d = got[("affr", "mt", "r")]
    assert d == [9.0, 0.0, 18.0] and m == pytest.approx(9.0) and s == pytest.approx(9.0)  # not beyond: no claim
    switched = ablate.comparisons({**RESULTS, "mt_focal": RESULTS["affr"]}, ["r"])
    assert ("mt_focal", "mt", "AP") in {(row, base, metric) for row, base, metric, *_ in switched}
    staged = {(row, base): d for row, base, metric, _, _, d in
              ablate.comparisons({**RESULTS, "ss": RESULTS["mt"], "all": RESULTS["affr"]}, ["r"]) if metric == "AP"}
    assert staged[("all", "ss")] == [1.0, 0.0, -1.0]  # the two-stage filter against the row without it
    lines = ablate.paired_table(RESULTS, ["r"])
    assert any("Mean Teacher - supervised continuation" in ln and "+3.33 ±  0.58" in ln and ln.endswith("higher")
               for ln in lines)
    assert any("+ FBR + AFFR - Mean Teacher" in ln and " AP " in ln and ln.endswith("within the spread")
               for ln in lines)


def test_plateau_rule_and_rare_class_visibility(tmp_path):
    flat = [(100 * i, ap) for i, ap in enumerate([30.0, 47.0, 50.0, 46.0, 48.5, 47.0, 49.5], 1)]
    assert ablate.plateau_gain(flat) == pytest.approx((48.5 + 47.0 + 49.5) / 3 - (47.0 + 50.0 + 46.0) / 3)
    assert ablate.at_plateau(flat)  # noisy but flat: one evaluation's +2.5 does not count
    climbing = [(100 * i, ap) for i, ap in enumerate([40.0, 42.0, 44.0, 46.0, 48.0, 47.0], 1)]
    assert not ablate.at_plateau(climbing)  # +5 AP between the windows, though the last evaluation fell
    assert ablate.plateau_gain(flat[:5]) is None and not ablate.at_plateau(flat[:5])  # too few to tell
    recs = [{"kind": "train", "step": 10, "pseudo/count/r": 9.0},  # before the branch point: not counted
            {"kind": "branch", "step": 10},
            {"kind": "train", "step": 20, "pseudo/count/r": 0.5, "acrst/pasted_labeled/r": 4.0,
             "acrst/pasted_pseudo/r": 0.0},
            {"kind": "train", "step": 40, "pseudo/count/r": 1.0, "acrst/pasted_labeled/r": 12.0,
             "acrst/pasted_pseudo/r": 3.0},
            {"kind": "eval", "step": 40, "model": "teacher", "stage": "mean_teacher", "AP_per_class": {"r": 7.5}},
            {"kind": "eval", "step": 40, "model": "student", "stage": "mean_teacher", "AP_per_class": {"r": 1.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    vis = ablate.rare_visibility(tmp_path, 10, ["r"])["r"]
    assert vis["kept"] == pytest.approx(0.5 * 10 + 1.0 * 20)  # per-step averages times the steps they cover
    assert (vis["pasted_labeled"], vis["pasted_pseudo"], vis["ap"]) == (12.0, 3.0, [(40, 7.5)])

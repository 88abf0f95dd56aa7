"""bench/ablate.py's summary: mean ± std over seeds, the mutual-learning gain, orderings only beyond the spread."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import ablate  # noqa: E402


def _run(sup: float, end: float, rare: float) -> dict:
    return {"supervised": {"AP": sup, "AP50": sup + 20, "AP_per_class": {"r": rare - 5}},
            "teacher": {"AP": end, "AP50": end + 20, "AP_per_class": {"r": rare}}}


def test_summary_over_seeds_and_orderings():
    results = {"mt": [_run(60, 68, 30), _run(62, 69, 32), _run(61, 70, 31)],
               "all": [_run(60, 75, 40), _run(62, 76, 42), _run(61, 77, 41)],
               "affr": [_run(60, 66, 30), _run(62, 72, 32), _run(61, 71, 31)]}
    s = ablate.summarize(results, ["r"])
    assert s["mt"]["AP"] == pytest.approx((69.0, 1.0)) and s["all"]["gain"] == pytest.approx((15.0, 1.0))
    assert s["mt"]["gain"][0] == pytest.approx(8.0) and s["all"]["r"] == pytest.approx((41.0, 1.0))
    text = ablate.table(s, ["r"], {"r": 3}, {}, 3)
    assert "69.00 ± 1.00" in text and "15.00 ± 1.00" in text
    lines = text.splitlines()
    assert any("+ FBR + AFFR + Two-stage + SS" in ln and "gain +7.00 (spread 2.00): higher" in ln for ln in lines)
    affr = [ln for ln in lines if ln.startswith("  + FBR + AFFR ") and "Two-stage" not in ln]
    assert len(affr) == 2 and all("within the spread" in ln for ln in affr)  # +0.67 AP against a 4.21 spread


def test_supervised_row_gain_is_over_the_same_steps():
    """`sup` has no mutual learning: its gain starts from the burn-in AP that the other rows of the seed share."""
    sup = lambda ap: {"supervised": {"AP": ap, "AP50": ap, "AP_per_class": {"r": 1.0}}, "teacher": None}  # noqa: E731
    results = {"sup": [sup(71), sup(72), sup(73)],
               "mt": [_run(60, 68, 30), _run(62, 69, 32), _run(61, 70, 31)]}
    s = ablate.summarize(results, ["r"])
    assert s["sup"]["gain"] == pytest.approx((11.0, 1.0))  # 71-60, 72-62, 73-61
    alone = ablate.summarize({"sup": results["sup"]}, ["r"])
    assert all(v != v for v in alone["sup"]["gain"])  # no shared burn-in to start from: NaN, not 0

"""The statistics of experiments/induction_by_size.py: the t interval and the formation step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "induction_by_size", Path(__file__).resolve().parents[1] / "experiments" / "induction_by_size.py")
ibs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ibs)


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281)])
def test_t_quantile_matches_the_tables(df, expected):
    assert ibs.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_t_interval_of_three_seeds():
    mean, lo, hi = ibs.t_interval([0.9, 0.95, 1.0])
    assert mean == pytest.approx(0.95)
    assert hi - mean == pytest.approx(4.3027 * 0.05 / 3 ** 0.5, rel=1e-3)
    assert mean - lo == pytest.approx(hi - mean)


def test_formation_step_is_the_first_eval_below_the_midpoint(tmp_path):
    losses = {100: 0.95, 200: 0.90, 300: 0.91, 400: 0.85, 500: 0.60, 600: 0.50, 700: 0.49}
    rows = [{"kind": "train", "step": 50, "loss": 2.0}] + [
        {"kind": "eval", "step": s, "loss": [v, 1.0]} for s, v in losses.items()]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # plateau 0.91 (after the warm-up, step > 100), final 0.49: midpoint 0.70, first below at 500
    assert ibs.formation_step(tmp_path, formed=True) == 500
    assert ibs.formation_step(tmp_path, formed=False) is None

"""scripts/evidence.py (``make evidence``): the claim rule, the study plumbing and a quick run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import evidence  # noqa: E402
import evidence_claims as claims  # noqa: E402
import evidence_report  # noqa: E402
import evidence_studies as studies  # noqa: E402
from evidence_results import CellResult, StudyResult  # noqa: E402

from advanced_training_utils.app.report.comparison import RunResult  # noqa: E402
from advanced_training_utils.app.report.intervals import mean_interval  # noqa: E402

HI = mean_interval([0.80, 0.81, 0.82])   # [0.785, 0.835]
LO = mean_interval([0.60, 0.61, 0.62])   # [0.585, 0.635]
MID = mean_interval([0.60, 0.70, 0.80])  # [0.45, 0.95]: overlaps both


@pytest.mark.parametrize(("a", "b", "better", "expected"), [
    (HI, LO, "higher", claims.HELD),
    (LO, HI, "higher", claims.DID_NOT_HOLD),
    (HI, MID, "higher", claims.NOT_SHOWN),
    (LO, HI, "lower", claims.HELD),
    (HI, LO, "lower", claims.DID_NOT_HOLD),
    (MID, LO, "lower", claims.NOT_SHOWN),
    (mean_interval([0.9]), LO, "higher", claims.NOT_SHOWN),  # one run: no interval
])
def test_claim_rule_says_held_not_shown_and_did_not_hold(a, b, better, expected):
    assert claims.verdict(a, b, better) == expected


def test_best_and_ratio_rules():
    assert claims.verdict_best(HI, [LO, LO], "higher") == claims.HELD
    assert claims.verdict_best(HI, [LO, MID], "higher") == claims.NOT_SHOWN
    assert claims.verdict_best(LO, [MID, HI], "higher") == claims.DID_NOT_HOLD
    assert claims.verdict_best(HI, [], "higher") == claims.NOT_SHOWN
    ratio = mean_interval([0.45, 0.46, 0.47])
    assert claims.verdict_value(ratio, 0.5, "lower") == claims.HELD        # >= 2x faster
    assert claims.verdict_value(HI, 0.5, "lower") == claims.DID_NOT_HOLD   # 0.8x: not 2x
    assert claims.verdict_value(MID, 0.5, "lower") == claims.NOT_SHOWN
    straddle = mean_interval([0.40, 0.45, 0.50])                           # [0.33, 0.57]
    assert claims.verdict_value(straddle, 0.5, "lower") == claims.NOT_SHOWN  # mean 0.45 < 0.5
    assert claims.verdict_value(straddle, 0.3, "higher") == claims.HELD
    with pytest.raises(ValueError, match="better must be 'higher' or 'lower', got 'up'"):
        claims.verdict(HI, LO, "up")


def test_observed_clip_is_the_median_to_two_digits():
    assert studies.observed_clip([4.0, 1.0, 3.0, math.nan]) == 3.0
    assert studies.observed_clip([1.234, 5.0, 2.345, 3.0]) == 2.7  # (2.345 + 3) / 2 = 2.67
    with pytest.raises(ValueError, match="no finite gradient norm"):
        studies.observed_clip([math.nan])


def test_config_key_is_canonical_so_equal_options_share_runs():
    assert evidence.config_key({}) == "stable"
    a = evidence.config_key({"scheduler_type": "cosine", "warmup_steps": 1})
    assert a == evidence.config_key({"warmup_steps": 1, "scheduler_type": "cosine"})
    assert a == "scheduler_type=cosine+warmup_steps=1"
    assert (evidence.config_key({"augment_options": {"policy": "SM", "noise_level": 0.0}})
            == "augment_options=noise_level=0.0,policy=SM")


def test_every_study_plans_distinct_cells_and_warmup_of_one_epoch():
    for st in studies.STUDIES.values():
        cells = st.cells(studies.FULL, {"steps_per_epoch": 25, "phase": st.phases,
                                        "observed_clip": 2.5})
        labels = [c.label for c in cells]
        keys = [evidence.config_key(c.options) for c in cells]
        assert len(set(labels)) == len(labels) and len(set(keys)) == len(keys), st.name
    sched = {c.label: c.options for c in studies.STUDIES["schedulers"].cells(
        studies.FULL, {"steps_per_epoch": 25})}
    assert sched["onecycle+warmup"]["warmup_steps"] == 25   # onecycle steps per batch
    assert sched["cosine+warmup"]["warmup_steps"] == 1      # the others per epoch
    assert sched["plateau"] == {}                            # the stable preset itself


def _run(config: str, seed: int, test: float, curve: list[float]) -> RunResult:
    return RunResult(config=config, seed=seed, run_dir=Path("."), monitor="val_loss",
                     mode="min", curve=curve, seconds=[1.0] * len(curve), best_epoch=len(curve),
                     best_value=curve[-1], final_value=curve[-1], test_name="test_accuracy",
                     test_value=test, wall_seconds=1.0, epochs_run=len(curve))


def _cell(label: str, tests: list[float], curve: list[float]) -> CellResult:
    c = CellResult(studies.Cell(label, {}), label, [Path(".")] * len(tests))
    c.runs = [_run(label, s, t, curve) for s, t in enumerate(tests)]
    c.extras = [{"s_per_epoch": 1.0} for _ in tests]
    return c


def test_guide_claims_are_generated_from_the_numbers():
    good, bad = [0.80, 0.81, 0.82], [0.60, 0.61, 0.62]
    cells = [_cell("plateau", good, [1.0, 0.5]), _cell("cosine", bad, [1.0, 0.9]),
             _cell("constant", bad, [1.0, 0.8]), _cell("onecycle", bad, [0.5, 0.4])]
    sr = StudyResult("schedulers", "S", "emotion", "", 2, cells, target=0.5)
    got = {c.guide: c for c in claims.guide_claims({"schedulers": sr})}
    assert got['plateau is "best for most cases"'].verdict == claims.HELD
    assert got["cosine is good for a fixed number of epochs"].verdict == claims.DID_NOT_HOLD
    assert got['onecycle gives the "fastest convergence"'].verdict == claims.HELD  # 1 < 2, 3
    assert "0.81 [0.7852, 0.8348]" in got['plateau is "best for most cases"'].evidence
    cells[0], cells[1] = _cell("plateau", bad, [1.0, 0.5]), _cell("cosine", good, [1.0, 0.9])
    sr = StudyResult("schedulers", "S", "emotion", "", 2, cells, target=0.5)
    got = {c.guide: c for c in claims.guide_claims({"schedulers": sr})}
    assert got['plateau is "best for most cases"'].verdict == claims.DID_NOT_HOLD


def test_quick_run_writes_tables_and_plots_and_skips_finished_runs(tmp_path, monkeypatch):
    notes = studies.STUDIES["notes"]
    tiny = studies.Study("notes", notes.title, "notes", notes.what, lambda scale, ctx: [
        studies.Cell("plateau, noise (stable)", {}),
        studies.Cell("cosine, noise", {"scheduler_type": "cosine"})])
    monkeypatch.setitem(studies.STUDIES, "notes", tiny)
    monkeypatch.setattr(evidence, "QUICK", studies.Scale(seeds=2, epochs=1, notes_epochs=1,
                                                         per_piece=1, fractions=(1.0,), jobs=1))
    args = ["--quick", "--study", "notes", "--scratch", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    assert evidence.main(args) == 0
    md = (tmp_path / "res" / "evidence-quick.md").read_text()
    assert "| plateau, noise (stable) | 2/2 |" in md and "| cosine, noise | 2/2 |" in md
    assert "test_bce" in md and "## The guide's claims" in md
    pngs = sorted((tmp_path / "res" / "evidence-quick").glob("*.png"))
    assert [p.name for p in pngs] == ["notes.png", "notes_curves.png"]
    assert all(0 < p.stat().st_size < 150_000 for p in pngs)
    assert "](evidence-quick/notes.png)" in md
    summaries = sorted((tmp_path / "runs").rglob("summary.json"))
    assert len(summaries) == 4
    before = [p.stat().st_mtime_ns for p in summaries]
    assert evidence.main(args) == 0                  # again: every run finished, none rerun
    assert [p.stat().st_mtime_ns for p in summaries] == before


def test_the_table_gives_epochs_and_training_seconds_to_the_target():
    cells = [_cell("fast", [0.8, 0.8, 0.8], [0.6, 0.4]), _cell("slow", [0.8, 0.8], [0.9, 0.8])]
    sr = StudyResult("schedulers", "S", "emotion", "", 2, cells, target=0.5)
    table = evidence_report.study_table(sr)
    fast = next(line for line in table.splitlines() if line.startswith("| fast "))
    slow = next(line for line in table.splitlines() if line.startswith("| slow "))
    # fast reaches 0.5 at epoch 2 (1 s per epoch: 2 s of training); slow never does
    assert "| 2 ± 0 [2, 2] (3/3) | 2 ± 0 [2, 2] |" in fast
    assert "| 3 ± 0 [3, 3] (0/2) | n/a |" in slow

"""`autoprune bench --time-budgets` (the anytime curve), seed-matched's time accounting, the scan a shorter
time budget sees, and `--proxy-sweep`: on digits with the small residual model, a few seconds per run."""

import re
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from autoprune.bench import equal_time
from autoprune.bench.anytime import HEADING, anytime_lines, anytime_table, duration_label
from autoprune.bench.equal_time import (BenchConfig, Subject, at_time, methods_at, proxy_table, proxy_that_ranks,
                                        row_times, seed_matched, sweep_columns, time_budgets)
from autoprune.cli import main
from autoprune.inputs.task import load_task
from autoprune.study.halving import RACE_BELOW, SCAN_SHARE
from conftest import TINY

SHORT, LONG = 6.0, 12.0  # seconds: the two time budgets of the smoke run
# seed-matched's wall time passes its time budget by what its final fine-tune does besides training: the
# cut, BatchNorm recalibration (8 batches) and the step that runs past the clock; autoprune's final
# fine-tune passes it by as much. Here, on an idle core, 0.25 s; the slack allows for a loaded test machine.
SLACK = 10.0  # the last step, the cut and BatchNorm recalibration, on a loaded machine (the accounting
# check below is the exact one)
QUICK = ["bench", "--quick", "--models", f"{TINY}:tiny_resnet", "--budgets", "0.4", "--quiet"]


@pytest.fixture(scope="module")
def anytime_run(tmp_path_factory):
    """A one-time-budget run of seed-matched, then the curve at two time budgets, then the curve again."""
    out = tmp_path_factory.mktemp("anytime")
    assert main([*QUICK, "--out", str(out), "--time-budget", f"{SHORT:g}", "--methods", "seed-matched"]) == 0
    first = pd.read_csv(out / "bench.csv")
    started = time.perf_counter()
    assert main([*QUICK, "--out", str(out), "--time-budgets", f"{SHORT:g}s,{LONG:g}s"]) == 0
    second = pd.read_csv(out / "bench.csv")
    assert main([*QUICK, "--out", str(out), "--time-budgets", f"{SHORT:g}s,{LONG:g}s"]) == 0
    return SimpleNamespace(out=out, first=first, second=second, third=pd.read_csv(out / "bench.csv"),
                           seconds=time.perf_counter() - started)


@pytest.mark.slow  # the bench's smoke run, twice over (~3 min)
def test_the_curve_has_rows_per_time_budget_and_resumes(anytime_run):
    first, second, third = anytime_run.first, anytime_run.second, anytime_run.third
    assert list(zip(first["method"], first["time_budget"])) == [("seed-matched", SHORT)]
    # The curve kept the earlier seed-matched row at SHORT and ran it again only at LONG; random at LONG only.
    made = sorted(zip(second["time_budget"], second["method"]))
    assert made == sorted([(SHORT, "seed-matched"), (SHORT, "autoprune"), (SHORT, "uniform-matched"),
                           (LONG, "seed-matched"), (LONG, "autoprune"), (LONG, "uniform-matched"),
                           (LONG, "random")])
    assert second.iloc[0].equals(first.iloc[0])  # not measured again
    assert len(third) == len(second)  # the rerun measured nothing
    measured = second.dropna(subset=["test_accuracy"])
    assert len(measured) == len(second) and (measured["flops_share"] <= 0.4 + 1e-9).all()
    # uniform-matched trains as long as the autoprune run of its own time budget took.
    for budget in (SHORT, LONG):
        rows = measured[measured["time_budget"] == budget].set_index("method")
        assert rows.loc["uniform-matched", "note"].startswith(f"{rows.loc['autoprune', 'wall_seconds']:.0f}s")


@pytest.mark.slow  # the bench's smoke run, twice over (~3 min)
def test_seed_matched_meets_the_budget_within_its_time(anytime_run):
    rows = anytime_run.second[anytime_run.second["method"] == "seed-matched"]
    assert len(rows) == 2 and (rows["flops_share"] <= 0.4 + 1e-9).all()  # thop, on the final model
    assert (rows["trials"] == 0).all()  # no race
    for row in rows.itertuples():
        assert row.time_budget - 1.0 <= row.wall_seconds <= row.time_budget + SLACK  # reserve here: ~0.01 s
    assert (rows["final_epochs"] > 0).all()
    for row in rows.itertuples():  # scan, plan and fine-tune fill the budget but the scoring reserve (0.6 s loaded)
        tuned, scanned = map(float, re.fullmatch(r"([\d.]+)s fine-tune after a ([\d.]+)s scan", row.note).groups())
        assert row.time_budget - 2.0 <= scanned + row.search_seconds + tuned <= row.time_budget + 0.2


@pytest.mark.slow  # the bench's smoke run, twice over (~3 min)
def test_the_report_draws_the_curve(anytime_run):
    text = (anytime_run.out / "BENCHMARKS.md").read_text()
    assert HEADING in text and "Which cheap score ranks candidates?" in text
    section = text[text.index(HEADING):]
    assert "| model | budget | method | 6s | 12s |" in section and "| seed-matched |" in section
    random = next(line for line in section.splitlines() if "| random |" in line)
    assert random.split("|")[4].strip() == "" and random.split("|")[5].strip()  # only at the longest
    assert (anytime_run.out / "anytime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (anytime_run.out / "bench.png").is_file()


def test_seed_matched_fine_tunes_for_the_time_the_scan_left(monkeypatch):
    """The clock: scan charged, plan fitted, the fine-tune given the rest less the scoring reserve."""
    given = {}

    def fake_seed(problem, config):
        time.sleep(0.3)  # fitting the plan counts
        return SimpleNamespace(to_dict=lambda: {"groups": {}})

    def fake_finish(problem, plan, epochs, seed, start, extra, seconds):
        given.update(epochs=epochs, seconds=seconds, start=start)
        return {"test_accuracy": 0.9, "finetune_seconds": seconds, "final_epochs": 3.0}

    monkeypatch.setattr(equal_time, "_seed", fake_seed)
    monkeypatch.setattr(equal_time, "finish", fake_finish)
    data = SimpleNamespace(val=range(500), test=range(500))
    subject = SimpleNamespace(scan_seconds=9.0, eval_seconds=0.01)  # reserve: 0.2 * 0.01 * 1000 = 2 s
    row = seed_matched(subject, SimpleNamespace(data=data), BenchConfig(time_budget=60.0), seed=0)
    assert given["epochs"] == 0.0 and given["start"] is None  # by the clock, from the cut
    assert 60.0 - 9.0 - 2.0 - 0.3 - 0.2 < given["seconds"] <= 60.0 - 9.0 - 2.0 - 0.3
    assert row["wall_seconds"] == pytest.approx(60.0 - 2.0, abs=0.2) and row["trials"] == 0
    with pytest.raises(equal_time.AutopruneError, match="time budget"):
        seed_matched(subject, SimpleNamespace(data=data), BenchConfig(time_budget=0.0), seed=0)


def _subject(table: pd.DataFrame) -> Subject:
    costs = SimpleNamespace(ids=["a", "b"], carried_flops={"a": 10.0, "b": 50.0}.get)
    return Subject("m", None, None, None, costs, table, 0.9, None, SimpleNamespace(grid=(0.3, 0.6, 0.9)),
                   scan_seconds=float(table["seconds"].sum()))


def test_a_shorter_time_budget_sees_the_first_cells_of_the_scan():
    # Measured coarse to fine: ratio 0.9 (b carries more FLOPs, so first), then 0.3, then 0.6.
    order = [("b", 0.9), ("a", 0.9), ("b", 0.3), ("a", 0.3), ("b", 0.6), ("a", 0.6)]
    table = pd.DataFrame([{"group": g, "ratio": r, "seconds": 1.0, "drop": 0.0} for g, r in order])
    shuffled = table.sample(frac=1.0, random_state=0).reset_index(drop=True)  # the order on disk does not matter
    cut = at_time(_subject(shuffled), 2.5 / SCAN_SHARE)  # a share of 2.5 s: three cells start within it
    assert sorted(zip(cut.table["group"], cut.table["ratio"])) == sorted(order[:3]) and cut.scan_seconds == 3.0
    whole = at_time(_subject(table), 100.0)  # a scan of this budget: its table whole
    assert whole.table.equals(table) and whole.scan_seconds == 6.0
    assert at_time(_subject(table), 0.0).table is table  # the trial-count search: no time budget


def test_time_budgets_and_legacy_rows():
    config = BenchConfig(time_budget=120.0, time_budgets=(600.0, 120.0, 1800.0), methods=("autoprune", "random"))
    assert time_budgets(config) == [120.0, 600.0, 1800.0] and time_budgets(BenchConfig()) == [120.0]
    assert methods_at(config, 120.0, time_budgets(config)) == ["autoprune"]
    assert methods_at(config, 1800.0, time_budgets(config)) == ["autoprune", "random"]
    every = BenchConfig(time_budgets=(60.0, 120.0), methods=("random",), random_every_time=True)
    assert methods_at(every, 60.0, time_budgets(every)) == ["random"]
    # The forced race runs only where autoprune's default does not race already (from RACE_BELOW on).
    raced = BenchConfig(time_budgets=(120.0, RACE_BELOW), methods=("autoprune", "autoprune-race"))
    assert methods_at(raced, 120.0, time_budgets(raced)) == ["autoprune"]
    assert methods_at(raced, RACE_BELOW, time_budgets(raced)) == ["autoprune", "autoprune-race"]
    alone = BenchConfig(time_budgets=(120.0,), methods=("autoprune-race",))
    assert methods_at(alone, 120.0, time_budgets(alone)) == ["autoprune-race"]
    # A floor row written before every row carried its time budget counts as made at --time-budget.
    frame = pd.DataFrame({"time_budget": [np.nan, 120.0, 600.0]})
    assert row_times(frame, config).tolist() == [120.0, 120.0, 600.0]
    assert duration_label(120) == "2m" and duration_label(90) == "90s"


def test_the_anytime_table_shows_curve_methods_per_time_budget():
    rows = []
    for budget_s in (120.0, 600.0):
        for seed in (0, 1):
            for method, acc in (("seed-matched", 0.80), ("autoprune", 0.82), ("uniform", 0.7),
                                ("uniform-matched-distill", 0.84)):
                if method in ("uniform", "uniform-matched-distill") and budget_s == 600.0:
                    continue  # a floor method, measured at one time budget: left out (a distilled row: kept)
                rows.append({"model": "m", "budget": 0.1, "seed": seed, "method": method,
                             "test_accuracy": acc + 0.01 * seed + (0.05 if budget_s == 600.0 else 0.0),
                             "wall_seconds": budget_s, "final_epochs": 1.0, "trials": 3.0 if method == "autoprune"
                             else 0.0, "time_budget": budget_s})
    frame = pd.DataFrame(rows)
    table = anytime_table(frame, frame["time_budget"], equal_time.METHODS)
    assert set(table["method"]) == {"seed-matched", "autoprune", "uniform-matched-distill"}
    auto = table[(table["method"] == "autoprune") & (table["time_budget"] == 600.0)].iloc[0]
    assert auto.test_mean == pytest.approx(0.875) and auto.runs == 2
    lines = anytime_lines(table, load_task(None))
    assert lines[0] == HEADING and "| model | budget | method | 2m | 10m |" in lines
    assert anytime_table(frame[frame["time_budget"] == 120.0], frame["time_budget"], equal_time.METHODS).empty


@pytest.mark.slow  # three 6 s runs and their cut
def test_uniform_matched_distill_trains_as_long_as_the_distilled_search_took(tmp_path):
    out, run = tmp_path / "kd", [*QUICK, "--out", str(tmp_path / "kd"), "--time-budget", f"{SHORT:g}", "--methods"]
    untimed = [*QUICK, "--out", str(tmp_path / "untimed"), "--time-budget", "0", "--methods"]
    assert main([*untimed, "uniform-matched-distill"]) == 0  # nothing to match, no time budget: a row that says so
    note = pd.read_csv(tmp_path / "untimed" / "bench.csv")["note"][0]
    assert note == "uniform-matched-distill needs the autoprune-distill row of this seed, or a time budget"
    assert main([*run, "autoprune-distill,uniform-matched-distill"]) == 0  # the search's row first, then matched
    rows = pd.read_csv(out / "bench.csv").set_index("method")
    assert len(list(out.rglob("teacher_outputs.pt"))) == 1  # the base's outputs, computed once for both rows
    searched, matched = rows.loc["autoprune-distill"], rows.loc["uniform-matched-distill"]
    assert matched["note"] == f"{searched['wall_seconds']:.0f}s of autoprune-distill"
    assert matched["wall_seconds"] == pytest.approx(searched["wall_seconds"], abs=2.0)
    assert matched["flops_share"] <= 0.4 + 1e-9 and matched["final_epochs"] > 0
    # Under a time budget with no row of its search (only the default's was run), the time budget itself.
    alone = tmp_path / "alone"
    assert main([*QUICK, "--out", str(alone), "--time-budget", f"{SHORT:g}", "--methods", "uniform-matched"]) == 0
    row = pd.read_csv(alone / "bench.csv").iloc[0]
    assert row["note"] == f"{SHORT:.0f}s time budget (no row of its search)"
    assert row["wall_seconds"] == pytest.approx(SHORT, abs=2.0) and row["final_epochs"] > 0


@pytest.mark.slow  # the bench's smoke run, twice over (~3 min)
def test_the_proxy_sweep_adds_its_columns_once(anytime_run, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(anytime_run.out, out)
    before = pd.read_csv(out / "proxies.csv")
    assert len(before) == 4 and not set(sweep_columns()) & set(before.columns)
    assert main([*QUICK, "--out", str(out), "--proxy-sweep"]) == 0
    after = pd.read_csv(out / "proxies.csv")
    assert len(after) == len(before)
    pd.testing.assert_frame_equal(after[before.columns], before)  # the rows kept, columns added
    assert "bn_score_b8_s1000" in after and "bn_score_b100_sall" in after
    assert after[sweep_columns()].apply(lambda c: c.between(0, 1)).all().all()
    # Two batches on the score split, from the same batches, is the bn_score measure_proxies took.
    assert np.allclose(after["bn_score_b2_s1000"], after["bn_score"], atol=1e-6)
    table = proxy_table(after)
    assert {"bn_score_b32_sall", "bn_score_b32_sall_p", "bn_score_p"} <= set(table.columns)
    text = (out / "BENCHMARKS.md").read_text()
    assert "b8_s1000" in text and "Ranks:" in text and HEADING in text  # the anytime section kept
    assert proxy_that_ranks(after, "nothing", 0.1) is None
    stamp = (out / "proxies.csv").stat().st_mtime_ns
    assert main([*QUICK, "--out", str(out), "--proxy-sweep"]) == 0  # a rerun measures nothing
    assert (out / "proxies.csv").stat().st_mtime_ns == stamp
    assert pd.read_csv(out / "bench.csv").equals(anytime_run.third)  # no method ran


def test_a_proxy_ranks_only_with_a_high_and_significant_rho():
    rng = np.random.default_rng(0)
    converged = rng.uniform(0.8, 0.9, 20)
    frame = pd.DataFrame({"model": "m", "budget": 0.1, "converged": converged, "converged_epochs": 5.0,
                          "bn_score": converged + rng.normal(0, 0.002, 20),  # ranks
                          "kd_loss": rng.uniform(0, 1, 20),  # noise
                          "bn_score_b8_s1000": -converged})  # ranks backwards
    table = proxy_table(frame).iloc[0]
    assert table["bn_score"] > 0.9 and table["bn_score_p"] < 0.001
    assert table["bn_score_b8_s1000"] < -0.9
    assert proxy_that_ranks(frame, "m", 0.1) == "bn_score"
    # rho 0.8 on four plans: p 0.2, not significant; and a proxy that ranks backwards does not rank.
    few = pd.DataFrame({"model": "m", "budget": 0.1, "converged": [0.1, 0.2, 0.3, 0.4], "converged_epochs": 5.0,
                        "bn_score": [0.1, 0.3, 0.2, 0.4], "kd_loss": [0.4, 0.3, 0.2, 0.1]})
    table = proxy_table(few).iloc[0]
    assert table["bn_score"] == pytest.approx(0.8) and table["bn_score_p"] > 0.05
    assert table["kd_loss"] == pytest.approx(1.0)  # a lower loss is the better plan
    assert proxy_that_ranks(few.assign(kd_loss=0.5), "m", 0.1) is None  # constant: no rho
    assert proxy_that_ranks(frame.assign(bn_score=-frame["converged"]), "m", 0.1) is None

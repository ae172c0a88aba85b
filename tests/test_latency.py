"""Latency budgets on a deterministic fake timer: parsing, the predictor, the cache, the search."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.cost.budget import Budget, fit_plan
from autoprune.cost.costmodel import CostModel
from autoprune.errors import AutopruneError
from autoprune.prune.groups import ChannelGroups
from autoprune.cost.latency import LatencyModel, LatencySettings, Meter, check, latency_costs


def fake_ms(model: nn.Module, inputs: torch.Tensor, simd: int = 2) -> float:
    """A deterministic 'latency': conv/linear work, plus per-layer and per-call overhead.

    Channel counts round up to multiples of ``simd`` (as vector units do), so it is not FLOPs.
    """
    total = [0.05]

    def hook(module, args, output):
        c_in, c_out = (module.in_features, module.out_features) if isinstance(module, nn.Linear) else \
            (module.in_channels // module.groups, module.out_channels)
        spatial = output[0, 0].numel() if output.dim() > 2 else 1
        total[0] += 0.002 + 1e-7 * math.ceil(c_in / simd) * simd * math.ceil(c_out / simd) * simd * spatial * len(output) * \
            int(np.prod(getattr(module, "kernel_size", (1,))))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model.eval()(inputs)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


class FakeTimer:
    """Times with :func:`fake_ms`; ``load`` slows every case alike on odd calls, ``busy`` on every call;
    counts what it timed."""

    def __init__(self, load: float = 1.0) -> None:
        self.cases: list[str] = []
        self.load, self.calls, self.busy = load, 0, 1.0

    def __call__(self, cases, repeats):
        self.calls += 1
        factor = (self.load if self.calls % 2 else 1.0) * self.busy
        self.cases += list(cases)
        return {name: [fake_ms(m, x) * factor] * repeats for name, (m, x) in cases.items()}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_LATENCY_CACHE", str(tmp_path / "latency"))
    return tmp_path / "latency"


def _setup(tiny, example, timer):
    groups = ChannelGroups(tiny, example)
    meter = Meter(tiny, LatencySettings(), timer)
    return groups, meter, latency_costs(groups, CostModel(groups), meter)


@pytest.mark.parametrize("text, value, relative", [("latency=3ms", 3.0, False), ("latency=500us", 0.5, False),
                                                   ("latency=0.5", 0.5, True), ("latency=40%", 0.4, True),
                                                   ("latency=0.002s", 2.0, False)])
def test_latency_budget_parses(text, value, relative):
    budget = Budget.parse(f"flops=0.5,{text}")
    assert (budget.latency, budget.latency_relative, budget.flops) == (pytest.approx(value), relative, 0.5)
    assert Budget.parse(str(budget)) == budget


@pytest.mark.parametrize("text", ["latency=3parsecs", "latency=3", "latency=0ms", "latency=1ms,latency=2ms"])
def test_bad_latency_budget_is_refused(text):
    with pytest.raises(AutopruneError, match="latency"):
        Budget.parse(text)


def test_bad_latency_settings_are_refused():
    with pytest.raises(AutopruneError, match="--latency-backend"):
        LatencySettings("foo")
    with pytest.raises(AutopruneError, match="--latency-threads"):
        LatencySettings(threads=0)


def test_predictor_is_close_to_the_fake_truth(tiny, example):
    groups, meter, costs = _setup(tiny, example, FakeTimer())
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):
        keep = {g.id: max(1, int(g.channels * rng.uniform(0.1, 1.0))) for g in groups}
        truth = fake_ms(groups.apply(groups.plan(keep)), meter.inputs)
        errors.append(abs(costs.predict(keep).latency / truth - 1))
    # The targets (steps of 8 channels, between grid points at small widths, miss them: see README).
    assert np.median(errors) < 0.10 and np.percentile(errors, 90) < 0.20
    assert costs.base.latency == pytest.approx(fake_ms(tiny, meter.inputs))


def test_machine_load_cancels_against_the_base(tiny, example):
    """Every other timing runs 3x slower; the base in the same loop cancels it."""
    groups = ChannelGroups(tiny, example)
    keep = {g.id: max(1, g.channels // 2) for g in groups}
    model = groups.apply(groups.plan(keep))
    meter = Meter(tiny, LatencySettings(), FakeTimer(load=3.0))
    truth = fake_ms(model, meter.inputs) / fake_ms(tiny, meter.inputs)
    assert meter.time(model).ms / meter.base_ms == pytest.approx(truth)
    steady = Meter(tiny, LatencySettings(), FakeTimer())
    assert meter.time(model).ms / meter.base_ms == pytest.approx(steady.time(model).ms / steady.base_ms)


def test_the_table_is_cached_a_second_study_measures_nothing(tiny, example, cache):
    first = FakeTimer()
    _setup(tiny, example, first)
    assert any(c.startswith("layer:") for c in first.cases) and list(cache.glob("*.json"))
    second = FakeTimer()
    _, _, costs = _setup(tiny, example, second)
    assert second.cases == ["base"]  # the base is timed, once; no layer, no calibration plan
    other = FakeTimer()
    ChannelGroups(tiny, example)
    LatencyModel(ChannelGroups(tiny, example), CostModel(ChannelGroups(tiny, example)),
                 Meter(tiny, LatencySettings(batch=4), other))
    assert any(c.startswith("layer:") for c in other.cases)  # another batch is another table


class SlowTimer(FakeTimer):
    """The same machine another day: everything 1.3x slower."""

    def __call__(self, cases, repeats):
        return {k: [v * 1.3 for v in vs] for k, vs in super().__call__(cases, repeats).items()}


def test_a_cached_table_is_anchored_to_the_base_as_timed_now(tiny, example):
    """A table cached on a fast day predicts in the units of a slow one: its predictions follow the base."""
    groups, _, fast = _setup(tiny, example, FakeTimer())
    _, _, slow = _setup(tiny, example, SlowTimer())
    keep = {g.id: max(1, g.channels // 2) for g in groups}
    assert slow.latency.predict(keep) == pytest.approx(1.3 * fast.latency.predict(keep), rel=1e-6)
    assert slow.latency.scale == pytest.approx(1.3) and fast.latency.scale == 1.0


def test_fit_plan_meets_the_latency_budget_as_measured(tiny, example):
    groups, meter, costs = _setup(tiny, example, FakeTimer())
    limits = Budget.parse("latency=0.6").limits(costs.base)
    n = len(groups)
    for seed in range(3):
        ratios = np.random.default_rng(seed).uniform(0, 0.9, n)
        plan, model, cost = fit_plan(groups, costs, ratios, limits, np.zeros(n), np.full(n, 0.9))
        truth = fake_ms(model, meter.inputs)
        assert cost.latency == pytest.approx(truth) and 0.9 * limits.latency <= truth <= limits.latency


def test_unreachable_latency_is_refused_with_the_smallest(tiny, example):
    groups, _, costs = _setup(tiny, example, FakeTimer())
    n = len(groups)
    limits = Budget.parse("latency=1us").limits(costs.base)
    with pytest.raises(AutopruneError, match="smallest reachable model.*predicted latency.*latency="):
        fit_plan(groups, costs, np.zeros(n), limits, np.zeros(n), np.full(n, 0.9))


def test_prediction_is_arithmetic_only(tiny, example, monkeypatch):
    groups, _, costs = _setup(tiny, example, FakeTimer())
    keep = costs.keep_vector({g.id: g.channels // 2 for g in groups})
    expected = costs.predict_vector(keep)
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert costs.predict_vector(keep) == expected


def test_check_reports_against_the_cap(tiny, example):
    groups = ChannelGroups(tiny, example)
    pruned = groups.apply(groups.plan({g.id: max(1, g.channels // 2) for g in groups}))
    found = check(tiny, pruned, LatencySettings(), share=0.9, timer=FakeTimer())
    assert found["within_budget"] and found["share_of_base"] < 0.9 and found["latency_backend"] == "torch"


def test_search_under_a_latency_budget_and_resume_with_other_settings_refused(tmp_path, digits_data):
    """Through the API on the fake timer: the budget is met as measured, recorded everywhere,
    and a resume with other latency settings is refused."""
    from conftest import TINY

    from autoprune.api import search
    from autoprune.report.pareto import trials_frame
    from autoprune.study.runs import open_run

    args = dict(trials=2, train_epochs=0, finetune_epochs=0.05, final_epochs=0, grid=[0.5], out=tmp_path / "run",
                quiet=True, latency_timer=FakeTimer())
    result = search(f"{TINY}:tiny_resnet", digits_data, "latency=0.6", **args)
    s = result.summary
    assert 0.9 * s["latency"]["budget_ms"] <= s["latency"]["ms"] <= s["latency"]["budget_ms"]
    assert s["latency_check"]["within_budget"] and "predicted_ms" in s["latency"]
    frame = trials_frame(open_run(result.study.study_name, run_dir=tmp_path / "run"))
    assert frame["latency_ms"].notna().all() and frame["feasible"].all()
    assert "user_attrs_latency_ms" in (tmp_path / "run" / "trials.csv").read_text()
    with pytest.raises(AutopruneError, match="latency_threads was 1, now 2"):
        search(f"{TINY}:tiny_resnet", digits_data, "latency=0.6", latency_threads=2, **args)


def test_a_latency_budget_is_taken_when_the_base_is_trained_here(tmp_path, digits_data):
    """No base to time before training: a relative latency cap waits for the trained base (it read as no
    cap at all and was refused as 'does not prune'), while the other caps are still checked first."""
    from conftest import TINY

    from autoprune.api import search

    args = dict(trials=1, train_epochs=0.5, finetune_epochs=0.05, final_epochs=0, grid=[0.5], quiet=True,
                latency_timer=FakeTimer())
    with pytest.raises(AutopruneError, match="cannot be met"):
        search(f"{TINY}:mlp", digits_data, "latency=0.6,flops=0.001", out=tmp_path / "no", **args)
    assert not (tmp_path / "no" / "base.pt").exists(), "the base was trained for a budget out of reach"
    with pytest.raises(AutopruneError, match=r"does not prune: .* ms\)"):  # was a crash (NaN) before training
        search(f"{TINY}:mlp", digits_data, "latency=50ms", out=tmp_path / "ms", **args)
    latency = search(f"{TINY}:mlp", digits_data, "latency=0.85", out=tmp_path / "run", **args).summary["latency"]
    assert latency["ms"] <= latency["budget_ms"] == pytest.approx(0.85 * latency["base_ms"])


def test_the_check_after_export_compares_shares_of_the_base_each_timed_in_its_own_loop(tmp_path, digits_data,
                                                                                        monkeypatch):
    """A machine twice as busy after the search: the winner is still within latency=0.6 of the base as
    timed now, though not within the search's milliseconds."""
    import autoprune.api as api
    import autoprune.export.final as final
    from conftest import TINY

    timer, export = FakeTimer(), final.export

    def export_then_busier(*args, **kwargs):
        found = export(*args, **kwargs)
        timer.busy = 2.0
        return found

    monkeypatch.setattr(final, "export", export_then_busier)
    s = api.search(f"{TINY}:tiny_resnet", digits_data, "latency=0.6", trials=1, train_epochs=0, finetune_epochs=0.05,
                   final_epochs=0, grid=[0.5], out=tmp_path / "run", quiet=True, latency_timer=timer).summary
    check = s["latency_check"]
    assert check["base_ms"] == pytest.approx(2 * s["latency"]["base_ms"], rel=0.01)
    assert check["within_budget"] and check["limit_ms"] == pytest.approx(0.6 * check["base_ms"], rel=1e-3)


def test_the_check_times_base_and_winner_in_one_fresh_process(tiny, example):
    """With the machine's own timer, in a new Python: a clean thread pool and allocator, and the
    classes of the user's model file (tiny_models.py) come with the models."""
    from conftest import TINY

    from autoprune.inputs.models import build_model

    base = build_model(f"{TINY}:tiny_resnet", num_classes=10).eval()
    groups = ChannelGroups(base, example)
    pruned = groups.apply(groups.plan({g.id: max(1, g.channels // 4) for g in groups}))
    found = check(base, pruned, LatencySettings(), share=0.9)
    assert found["timed_in"] == "a fresh process", found["timed_in"]
    assert found["limit_ms"] == pytest.approx(0.9 * found["base_ms"], rel=1e-3) and found["measured_ms"] > 0


@pytest.mark.slow
def test_real_timer_fits_the_budget_as_it_measures(tiny, example):
    """The wall-clock timer end to end on a tiny model: what comes back is within budget as timed."""
    groups, meter, costs = _setup(tiny, example, None)
    assert meter.base_ms > 0 and meter.base_spread_ms >= 0
    limits = Budget.parse("latency=0.7").limits(costs.base)
    n = len(groups)
    _, _, cost = fit_plan(groups, costs, np.zeros(n), limits, np.zeros(n), np.full(n, 0.9))
    assert cost.latency <= limits.latency and costs.last.repeats >= 20


def test_bench_latency_measures_every_setting_and_resumes(tmp_path):
    """The predictor-accuracy benchmark on the fake timer: a row per plan and setting, each within the
    fake's truth, a table, and a rerun that measures nothing."""
    from conftest import TINY

    from autoprune.bench.latency import bench_latency, table_lines

    spec = f"{TINY}:tiny_resnet"
    frame = bench_latency([spec], ["torch"], [1, 4], plans=5, out=tmp_path, quiet=True, timer=FakeTimer())
    assert sorted(frame.groupby("batch").size().tolist()) == [5, 5]
    assert (frame["measured_ms"] < frame["base_ms"]).all()  # every random plan cuts something
    assert frame["error"].abs().median() < 0.10  # the target, on a timer with no noise
    lines = table_lines(frame)
    assert sum(line.startswith(f"| {spec} | torch |") for line in lines) == 2
    timer = FakeTimer()
    again = bench_latency([spec], ["torch"], [1, 4], plans=5, out=tmp_path, quiet=True, timer=timer)
    assert len(again) == 10 and timer.calls == 0


def test_latency_search_benchmark_caps_at_the_flops_winners_latency_and_resumes(tmp_path, digits_data):
    """`bench-latency --search` on the fake timer: per seed a FLOPs search, then a latency search capped
    at its winner's latency, both re-timed after export; the cap holds; a rerun searches nothing."""
    from conftest import TINY

    from autoprune.bench.latency import latency_searches, search_lines
    from autoprune.inputs.models import build_model
    from autoprune.options import SearchOptions

    spec = f"{TINY}:tiny_resnet"
    weights = tmp_path / "base.pt"
    torch.save(build_model(spec, digits_data.num_classes).state_dict(), weights)
    options = SearchOptions(trials=2, finetune_epochs=0.05, final_epochs=0, grid=[0.5], latency_timer=FakeTimer())
    frame = latency_searches(spec, 0.5, [0], options, tmp_path, quiet=True, data=digits_data, weights=weights)
    flops, latency = (frame[frame["kind"] == k].iloc[0] for k in ("flops", "latency"))
    assert flops.budget == "flops=0.5" and latency.budget.startswith("latency=0.")  # a share of the base
    assert latency.cap_ms == pytest.approx(flops.latency_ms, rel=1e-3)  # the fake timer has no noise
    assert 0.9 <= latency.share_of_cap <= 1.0 and flops.flops_share <= 0.5
    assert sum(line.startswith(f"| {spec} | 0 |") for line in search_lines(frame)) == 1
    timer = FakeTimer()
    again = latency_searches(spec, 0.5, [0], options.replace(latency_timer=timer), tmp_path, quiet=True,
                             data=digits_data, weights=weights)
    assert len(again) == 2 and timer.calls == 0


def test_an_over_budget_build_aims_the_next_prediction_below_the_cap():
    """A plan predicted 2 % under its latency cap built 0.02 % over it: the next target goes under the
    prediction (tightening the target by the overshoot alone found the same plan six times over)."""
    from autoprune.cost.budget import _tightened
    from autoprune.counting import Cost

    inf = math.inf
    target = _tightened(Cost(inf, inf, 0.2812), Cost(2e6, 1e4, 0.2753), Cost(2e6, 1e4, 0.28125),
                        Cost(inf, inf, 0.2812))
    assert target.latency < 0.2753 * 0.2812 / 0.28125 and (target.flops, target.params) == (inf, inf)
    flops = _tightened(Cost(1e6, inf, inf), Cost(0.99e6, 5e3, inf), Cost(1.01e6, 5e3, 0.2), Cost(1e6, inf, inf))
    assert flops.flops < 0.99e6 and flops.latency == inf


def test_bench_latency_sections_replace_their_own_and_keep_the_rest(tmp_path):
    """bench-latency writes its sections into BENCHMARKS.md in place, with the command, and leaves what
    `bench` wrote; `bench` keeps them (own_sections) when it rewrites the file."""
    from autoprune.bench.markdown import HEADINGS, own_sections, update_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## resnet18\n\nrow\n")
    update_section(path, [HEADINGS[0], "", "| old |"], "autoprune bench-latency --plans 3")
    update_section(path, [HEADINGS[1], "", "| search |"], "autoprune bench-latency --search m")
    update_section(path, [HEADINGS[0], "", "| new |"], "autoprune bench-latency --plans 30")
    text = path.read_text()
    assert "## resnet18\n\nrow\n" in text and "| old |" not in text and "--plans 30`" in text
    assert text.index("| new |") < text.index("| search |")  # replaced where it stood
    kept = own_sections(path)
    assert kept[0] == HEADINGS[0] and "| search |" in kept and "row" not in kept


def test_a_candidate_no_plan_fits_is_dropped_and_the_search_goes_on(tmp_path, digits_data, monkeypatch):
    """A candidate that stays over its latency cap however tightened is a pruned trial, not a crash."""
    from conftest import TINY

    import autoprune.study.trials as study_module
    from autoprune.api import search
    from autoprune.cost.budget import NoFit, fit_plan

    calls = []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise NoFit("could not fit a plan into the budget (a test)")
        return fit_plan(*args, **kwargs)

    monkeypatch.setattr(study_module, "fit_plan", fails_second)
    result = search(f"{TINY}:tiny_resnet", digits_data, "latency=0.6", trials=3, train_epochs=0,
                    finetune_epochs=0.05, final_epochs=0, grid=[0.5], out=tmp_path / "run", quiet=True,
                    pruner="none", latency_timer=FakeTimer())
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert "a test" in trials[1].user_attrs["no_fit"] and result.summary["trial"] in (0, 2)


def test_latency_search_benchmark_keys_its_rows_by_the_flops_budget_too(tmp_path, digits_data):
    """Rows measured at one --flops do not stand for another: a second budget is searched, not skipped."""
    from conftest import TINY

    from autoprune.bench.latency import latency_searches
    from autoprune.inputs.models import build_model
    from autoprune.options import SearchOptions

    spec = f"{TINY}:tiny_resnet"
    weights = tmp_path / "base.pt"
    torch.save(build_model(spec, digits_data.num_classes).state_dict(), weights)
    options = SearchOptions(trials=1, finetune_epochs=0.05, final_epochs=0, grid=[0.5], latency_timer=FakeTimer())
    for flops in (0.5, 0.6):
        frame = latency_searches(spec, flops, [0], options, tmp_path, quiet=True, data=digits_data, weights=weights)
    assert sorted(frame["flops_budget"].tolist()) == [0.5, 0.5, 0.6, 0.6]

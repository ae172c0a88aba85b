"""The search's pruner (screening by the cheap score, checks during fine-tuning) and warm starts."""

import numpy as np
import optuna
import pytest
import torch

from autoprune.cost.budget import Budget
from autoprune.cost.costmodel import CostModel
from autoprune.counting import count
from autoprune.export.final import finetune
from autoprune.prune.groups import ChannelGroups
from autoprune.study.trials import Problem, Settings, checkpoint, keep_best_checkpoints, run, trial_plan
from autoprune.train.loop import train

PRUNED, COMPLETE = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE


@pytest.fixture
def problem(tiny, example, digits_data, tmp_path):
    """The tiny residual model, untrained: any cut of it scores near chance before fine-tuning."""
    groups = ChannelGroups(tiny, example)
    costs = CostModel(groups)
    n = len(groups)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    return Problem(tiny, digits_data, groups, costs, Budget(flops=0.5).limits(costs.base), np.zeros(n),
                   np.full(n, 0.8), np.full(n, 0.3), 0.1, torch.device("cpu"), checkpoints=folder)


def _study(scores, checks=None, values=None) -> optuna.Study:
    """Finished trials with cheap scores ``scores``, half-way checks ``checks`` and final ``values``
    (both default to the scores, so the cheap score ranks them perfectly)."""
    study = optuna.create_study(direction="maximize")
    for score, check, value in zip(scores, checks or scores, values or scores):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={0: score, 1: check}))
    return study


STRONG = [0.95, 0.96, 0.97, 0.98, 0.99]


SHORT = dict(finetune_epochs=0.2, trials=4)


def test_a_candidate_below_the_median_cheap_score_is_never_fine_tuned(problem, monkeypatch):
    tuned = []
    monkeypatch.setattr("autoprune.study.trials.train", lambda *a, **k: tuned.append(1))
    study = _study(STRONG)  # five strong finished trials; an untrained cut scores ~10 %
    run(problem, study, Settings(**{**SHORT, "trials": 6}), quiet=True, seed_first=False)
    new = study.trials[-1]
    assert new.state == PRUNED and new.last_step == 0 and not tuned
    assert new.intermediate_values[0] < 0.97 and "val_accuracy" not in new.user_attrs
    assert new.user_attrs["flops_share"] <= 0.5  # the cut was made and recorded, within budget
    assert not list(problem.checkpoints.iterdir())  # nothing fine-tuned, nothing kept


def test_where_the_cheap_score_does_not_rank_it_screens_nothing_and_the_half_way_check_prunes(
        problem, monkeypatch):
    # strong cheap scores, but in the opposite order of the finished trials' values: no screening
    study = _study(STRONG, checks=[1.0] * 5, values=STRONG[::-1])
    steps = []
    original = train

    def counting(*args, **kwargs):
        steps.append(kwargs["checks"])
        return original(*args, **kwargs)

    monkeypatch.setattr("autoprune.study.trials.train", counting)
    run(problem, study, Settings(**{**SHORT, "trials": 6}), quiet=True, seed_first=False)
    new = study.trials[-1]
    assert new.intermediate_values[0] < 0.5  # far below the median cheap score, yet fine-tuned
    assert new.state == PRUNED and new.last_step == 1 and steps == [1]


def test_the_pruner_can_be_turned_off_and_pruned_trials_count_towards_the_total(problem):
    study = _study(STRONG)
    run(problem, study, Settings(pruner="none", **{**SHORT, "trials": 6}), quiet=True, seed_first=False)
    assert study.trials[-1].state == COMPLETE  # screened by nothing, though far below the others
    run(problem, study, Settings(**{**SHORT, "trials": 8}), quiet=True, seed_first=False)
    assert study.trials[-1].state == PRUNED
    assert sum(t.state in (PRUNED, COMPLETE) for t in study.trials) == 8  # as Optuna's n_trials counts


def test_an_unknown_pruner_is_refused():
    from autoprune.errors import AutopruneError

    with pytest.raises(AutopruneError, match="unknown pruner 'hyperband'; choose from median, none"):
        Settings(pruner="hyperband")


def test_only_the_best_finished_trials_keep_their_weights(tmp_path):
    study = _study([0.5, 0.9, 0.7, 0.8, 0.6])
    running = study.ask()
    for number in (*range(5), running.number):
        torch.save({}, checkpoint(tmp_path, number))
    keep_best_checkpoints(study, tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-1.pt", "trial-2.pt", "trial-3.pt", "trial-5.pt"]


def test_the_final_fine_tune_goes_on_from_the_winning_trials_weights(problem):
    study = optuna.create_study(direction="maximize")
    run(problem, study, Settings(pruner="none", **SHORT), quiet=True)
    best = study.best_trial
    start = checkpoint(problem.checkpoints, best.number)
    plan = trial_plan(best)
    warm, _, _ = finetune(problem, plan, Settings(final_epochs=0.0), start)
    cold, _, _ = finetune(problem, plan, Settings(final_epochs=0.0))
    saved = torch.load(start)
    weights = {k: v for k, v in warm.state_dict().items() if k.endswith("weight")}
    assert all(torch.equal(v, saved[k]) for k, v in weights.items())  # the trial's weights, not the base's
    assert not all(torch.equal(v, cold.state_dict()[k]) for k, v in weights.items())
    assert count(warm, problem.groups.example_input) == count(cold, problem.groups.example_input)


def test_the_screen_compares_with_every_trial_that_got_as_far_pruned_ones_included():
    from autoprune.study.trials import ReachedMedianPruner

    study = _study([0.9, 0.91, 0.92, 0.93, 0.94])
    for _ in range(6):  # screened out earlier with a cheap score of 10 %
        study.add_trial(optuna.trial.create_trial(state=PRUNED, intermediate_values={0: 0.1}))
    pruner = ReachedMedianPruner(startup=3)
    candidate = study.ask()
    candidate.report(0.5, 0)
    frozen = study._storage.get_trial(candidate._trial_id)
    assert not pruner.prune(study, frozen)  # above the median of the eleven that got as far (0.1)
    assert optuna.pruners.MedianPruner(n_startup_trials=3).prune(study, frozen)  # finished ones only: 0.92
    candidate.report(0.05, 1)  # step 1: the five finished trials were at 0.9 and more
    assert pruner.prune(study, study._storage.get_trial(candidate._trial_id))
    assert not ReachedMedianPruner(startup=6).prune(study, study._storage.get_trial(candidate._trial_id))

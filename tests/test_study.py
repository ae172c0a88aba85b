import optuna
import pytest

from autoprune.errors import AutopruneError
from autoprune.study.storage import SharedTable, open_study, storage_for
from autoprune.study.workers import HOLD_ENV, Worker, heartbeat, hold_for_test, recover, surplus


def test_resuming_with_another_configuration_names_what_differs(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = {"model": "resnet18", "budget": "flops=0.3", "lr": 0.01}
    study = open_study("s", url, config)
    study.add_trial(optuna.trial.create_trial(value=0.5))
    assert len(open_study("s", url, config).trials) == 1  # same configuration: resumed
    with pytest.raises(AutopruneError, match=r"budget was 'flops=0.3', now 'flops=0.2'.*--new-study"):
        open_study("s", url, {**config, "budget": "flops=0.2"})
    fresh = open_study("s", url, {**config, "budget": "flops=0.2"}, new=True)
    assert len(fresh.trials) == 0 and fresh.user_attrs["config"]["budget"] == "flops=0.2"


def test_unknown_storage_is_refused():
    with pytest.raises(AutopruneError, match="unknown storage"):
        storage_for("redis-ish://nowhere")


def _dead_trial(study):
    """A RUNNING trial whose worker (a pid that no longer exists on this host) was killed."""
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    me = Worker.me()
    study._storage.set_trial_system_attr(trial._trial_id, "autoprune:worker",
                                         {"host": me.host, "pid": 2 ** 22 + 1, "started": ""})
    return trial


def test_a_killed_workers_trial_is_failed_and_queued_again_once(tmp_path):
    study = open_study("s", str(tmp_path / "study.log"), {"a": 1})
    trial = _dead_trial(study)
    x = trial.params["x"]
    assert recover(study) == [trial.number]
    assert recover(study) == []  # a second worker finds nothing left to recover
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "WAITING"]
    retry = study.ask()
    assert retry.suggest_float("x", 0, 1) == x and retry.user_attrs == {"retry_of": 0, "retries": 1}


@pytest.mark.process
def test_a_live_trial_of_this_host_is_left_alone_and_silence_elsewhere_is_death(tmp_path):
    study = open_study("s", str(tmp_path / "study.log"), {"a": 1})
    with heartbeat(study, study.ask()._trial_id):
        assert recover(study) == []
    other = study.ask()
    study._storage.set_trial_system_attr(other._trial_id, "autoprune:worker",
                                         {"host": "elsewhere", "pid": 1, "started": ""})
    study._storage.set_trial_system_attr(other._trial_id, "autoprune:beat", 1.0)  # silent since 1970
    assert recover(study, grace=60) == [other.number]


@pytest.mark.process
def test_the_test_only_hold_waits_for_every_worker_and_fails_without_them(tmp_path, monkeypatch):
    study = open_study("s", str(tmp_path / "study.log"), {"a": 1})
    hold_for_test(study)  # unset: nothing to wait for
    monkeypatch.setenv(HOLD_ENV, "2")
    monkeypatch.setattr("autoprune.study.workers.HOLD_TIMEOUT_S", 0.0)
    with heartbeat(study, study.ask()._trial_id):
        with pytest.raises(AutopruneError, match="only 1 worker process"):
            hold_for_test(study)  # the other worker never started a trial
        other = study.ask()
        study._storage.set_trial_system_attr(other._trial_id, "autoprune:worker",
                                             {"host": "elsewhere", "pid": 1, "started": ""})
        hold_for_test(study)  # both have: it returns


def test_a_trial_started_past_the_total_issurplus(tmp_path):
    study = open_study("s", str(tmp_path / "study.log"), {"a": 1})
    study.add_trial(optuna.trial.create_trial(value=0.5))
    first, second = study.ask(), study.ask()  # two workers start at once, one trial is missing
    assert surplus(study, first.number, 2) is None
    assert "already finished or running" in surplus(study, second.number, 2)
    assert surplus(study, second.number, 3) is None


def test_a_queued_trial_queued_twice_runs_once(tmp_path):
    study = open_study("s", str(tmp_path / "study.log"), {"a": 1})
    study.enqueue_trial({"x": 0.25})
    study.enqueue_trial({"x": 0.25})  # two workers queued the seed at the same moment
    first, second = study.ask(), study.ask()
    assert surplus(study, first.number, 10) is None
    assert "copy of an earlier queued trial" in surplus(study, second.number, 10)


def test_a_half_written_journal_line_is_cut_off(tmp_path):
    path = tmp_path / "study.log"
    open_study("s", str(path), {"a": 1}).add_trial(optuna.trial.create_trial(value=0.5))
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 4, "worker_id": "x", "study_id": 0, "da')  # killed mid-append
    study = open_study("s", str(path), {"a": 1})
    study.add_trial(optuna.trial.create_trial(value=0.6))
    assert [t.value for t in open_study("s", str(path), {"a": 1}).trials] == [0.5, 0.6]


def test_sensitivity_cells_are_shared_through_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    row = {"base_model": "abc", "importance": "l1", "group": "conv1", "ratio": 0.5, "drop": 0.1}
    SharedTable(open_study("s", url, {"a": 1})).add(row)
    SharedTable(open_study("s", url, {"a": 1})).add({**row, "drop": 0.9})  # a late duplicate loses
    assert SharedTable(open_study("s", url, {"a": 1})).rows() == [row]


def test_a_run_folder_with_a_journal_opens_without_storage(tmp_path):
    """A --workers run writes study.log, not study.db: open_run (pareto, report, export) finds it."""
    from autoprune.study.runs import list_studies, open_run

    folder = tmp_path / "run"
    open_study("s", str(folder / "study.log"), {"budget": "flops=0.5"})
    assert open_run("s", run_dir=folder).storage == str(folder / "study.log")
    assert list_studies(root=tmp_path)["study"].tolist() == ["s"]
    with pytest.raises(AutopruneError, match="nor a .*study.log"):
        open_run("s", run_dir=tmp_path / "elsewhere")

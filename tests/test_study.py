import optuna
import pytest

from autoprune.errors import AutopruneError
from autoprune.study import open_study, storage_for


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


def test_database_storage_has_heartbeats(tmp_path):
    storage = storage_for(f"sqlite:///{tmp_path / 'x.db'}")
    assert storage.get_heartbeat_interval() == 20

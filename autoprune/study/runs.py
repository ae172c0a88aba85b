"""A search's run: its study and run directory, set up by ``search`` (:func:`start_study`) and opened
again by ``pareto``, ``report``, ``export`` and ``studies``.

These read what ``search`` left: the Optuna study (plans, costs and accuracies live on the trials,
the configuration and what export needs on the study) and the run directory (``base.pt``,
``sensitivity.csv``). Nothing here trains, and nothing but :func:`start_study` and
:func:`record_run` writes to the study.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch

from autoprune.cost.budget import STRATA, Budget, BudgetRange, parse_budget
from autoprune.cost.costmodel import CostModel
from autoprune.cost.latency import LatencySettings
from autoprune.counting import Cost
from autoprune.errors import AutopruneError
from autoprune.files import fingerprint, save_torch
from autoprune.inputs.data import Data, load_data
from autoprune.inputs.models import absolute_spec, build_model, load_weights
from autoprune.inputs.task import SCORE, Score, Task, load_task, score_record
from autoprune.options import SearchOptions
from autoprune.prune.groups import ChannelGroups
from autoprune.study.checks import claim_run, run_owner
from autoprune.study.pipeline import Prepared, default_storage
from autoprune.study.space import SearchSpace
from autoprune.study.storage import open_study, storage_for
from autoprune.study.trials import Problem, Settings, config_dict, finished
from autoprune.train.loop import evaluate, resolve_device
from autoprune.train.teacher import TEACHER_OUTPUTS, teacher_outputs

RESULTS = Path("results")
RUN_FOLDER = "run_folder"  # study attribute: the run folder's absolute path, as the last search ran
MODEL_PATH = "model_path"  # study attribute: the model spec with its file's absolute path
FINAL_EXTRA = "final_extra"  # study attribute: the optional fine-tune modes of the search's final fine-tune
LATENCY_SETTINGS = "latency_settings"  # study attribute: what the trials' recorded latencies were measured with


@dataclass
class Run:
    """A stored study with the run directory that holds its base model and sensitivity table."""

    study: optuna.Study
    storage: str
    folder: Path

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def config(self) -> dict[str, Any]:
        return self.study.user_attrs.get("config", {})

    @property
    def model(self) -> str:
        """The model spec, rebuildable from any folder (older studies: as the search was given it)."""
        return self.study.user_attrs.get(MODEL_PATH, self.config["model"])

    def complete(self) -> list[optuna.trial.FrozenTrial]:
        """Finished trials that carry what a search records (plan, costs, accuracy)."""
        return [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if {"plan", "flops", "flops_share", "params", "params_share"} <= set(t.user_attrs)]

    def base_cost(self) -> Cost:
        """The base model's FLOPs (thop MACs) and params, read back from any finished trial."""
        trials = self.complete()
        if not trials:
            raise AutopruneError(f"study {self.name!r} has no finished trial yet; run the search first")
        attrs = trials[0].user_attrs
        latency = attrs["latency_ms"] / attrs["latency_share"] if "latency_share" in attrs else float("inf")
        return Cost(attrs["flops"] / attrs["flops_share"], attrs["params"] / attrs["params_share"], latency)

    @property
    def budget(self) -> Budget | BudgetRange:
        return parse_budget(self.config["budget"])

    def limits(self) -> Cost:
        """The budget's absolute caps (``inf`` where it sets none; a range's upper end)."""
        return self.budget.limits(self.base_cost())

    def sensitivity(self) -> pd.DataFrame:
        """The sensitivity rows for this study's base model and importance criterion."""
        path = self.folder / "sensitivity.csv"
        if not path.is_file():
            raise AutopruneError(f"{path} does not exist; pass --run-dir, the folder the search wrote")
        table = pd.read_csv(path)
        mine = ((table["base_model"].astype(str) == str(self.config.get("base_model")))
                & (table["importance"] == self.config.get("importance", "l1")))
        return table[mine].reset_index(drop=True)

    @property
    def score(self) -> Score:
        """What the trials' values are (their name and print format): accuracy for older studies."""
        return Score.of(self.study.user_attrs)

    def base_val_accuracy(self) -> float | None:
        """The unpruned model's validation accuracy, as the sensitivity scan measured it."""
        try:
            table = self.sensitivity()
        except AutopruneError:
            return None
        return float((table["val_accuracy"] + table["drop"]).iloc[0]) if len(table) else None


def quiet_storage(url: str) -> optuna.storages.BaseStorage | str:
    """An existing storage, without Optuna's notices that heartbeats are experimental.

    A SQLite or journal file that is not there is refused rather than created empty.
    """
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else Path(url)
    if (url.startswith("sqlite:///") or url.endswith((".log", ".journal"))) and not path.is_file():
        raise AutopruneError(f"storage {url} does not exist; pass the storage the search used")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return storage_for(url)


def start_study(run: Prepared, budget: Budget | BudgetRange, space: SearchSpace, options: SearchOptions,
                settings: Settings, latency: LatencySettings) -> optuna.Study:
    """Open (or resume) the channel search's study in ``run``'s folder with its configuration (a resume
    with another is refused) and what export, pareto and report read back; keep the base model beside it."""
    o, data, extra = options, run.data, settings.extra
    config = config_dict(model=run.name, base_model=run.base_id, dataset=data.name, budget=str(budget),
                         importance=space.importance, grid=[float(g) for g in space.grid],
                         max_ratio=space.max_ratio, space=space.to_dict(),
                         finetune_epochs=o.finetune_epochs, lr=o.lr, batch_size=o.batch_size,
                         bn_batches=o.bn_batches, seed=o.seed, pruner=settings.pruner,
                         **({} if data.task.is_classification else {"task": data.task.label}),  # absent: classification
                         **(latency.config() if budget.latency is not None else {}),  # absent: older studies resume
                         **{k: v for k, v in extra.items() if k == "distill"},  # soft pruning: export only
                         **({"strata": STRATA} if isinstance(budget, BudgetRange) else {}))
    claim_run(run.out, run.study)
    study = open_study(run.study, run.storage, config, new=o.new_study)
    study.set_user_attr(FINAL_EXTRA, extra)  # so `export` fine-tunes as this run's final fine-tune does
    study.set_user_attr(LATENCY_SETTINGS, latency.config())  # what the trials' latencies mean
    study.set_user_attr(SCORE, score_record(data.task))  # what the trials' values are, for pareto and report
    record_run(study, run.out, run.name)
    if not (run.out / "base.pt").is_file():
        save_torch(run.base.state_dict(), run.out / "base.pt")
    return study


def final_extra(study: optuna.Study) -> dict[str, Any]:
    """The optional fine-tune modes the search's final fine-tune used (older studies: distillation only)."""
    if FINAL_EXTRA in study.user_attrs:
        return dict(study.user_attrs[FINAL_EXTRA])
    return {k: v for k, v in study.user_attrs.get("config", {}).items() if k == "distill"}


def record_run(study: optuna.Study, folder: Path, model: str) -> None:
    """Record on the study where its run folder is and how to rebuild its model from any folder, so
    the commands that read it find both given only its storage."""
    study.set_user_attr(RUN_FOLDER, str(folder.resolve()))
    study.set_user_attr(MODEL_PATH, absolute_spec(model))


def _run_folder(study: optuna.Study, storage: str, default: Path) -> Path:
    """The folder ``study`` recorded, else (older studies) the folder of its storage file; either only
    where its run.json names this study (a folder moved or shared), else ``default``."""
    recorded = study.user_attrs.get(RUN_FOLDER)
    file = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else storage
    for folder in ([Path(recorded)] if recorded else []) + [Path(file).parent]:
        if run_owner(folder) == study.study_name:
            return folder
    return default


def run_storage(study: str, run_dir: str | Path | None = None) -> str:
    """The storage ``search`` wrote in ``results/STUDY`` (or ``run_dir``): its ``study.log`` journal
    where a ``--workers`` run left one, else its ``study.db``."""
    return default_storage(Path(run_dir) if run_dir else RESULTS / study)


def open_run(study: str, storage: str | None = None, run_dir: str | Path | None = None) -> Run:
    """The study ``study`` from ``storage`` (default: the one ``search`` writes for that name), with
    its run folder: ``run_dir``, else with ``storage`` the folder the study recorded.

    Example:
        >>> run = open_run("resnet18-digits-flops0.25")
        >>> run.config["budget"]
        'flops=0.25'
    """
    folder = Path(run_dir) if run_dir else RESULTS / study
    given = storage is not None and run_dir is None
    if storage is None:
        if not any((folder / f).is_file() for f in ("study.db", "study.log")):
            raise AutopruneError(f"no study database at {folder / 'study.db'} (nor a {folder / 'study.log'} "
                                 "journal); pass --storage URL or --run-dir, the folder the search wrote")
        storage = run_storage(study, folder)
    try:
        found = optuna.load_study(study_name=study, storage=quiet_storage(storage))
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(quiet_storage(storage))) or "none"
        raise AutopruneError(f"no study {study!r} in {storage} (studies there: {names})") from None
    if "config" not in found.user_attrs:
        raise AutopruneError(f"study {study!r} was not made by autoprune search (it records no configuration); "
                             "name the search's study")
    return Run(found, storage, _run_folder(found, storage, folder) if given else folder)


def rebuild_problem(run: Run, data_dir: str | Path = "data", download: bool = False,
                    device: str = "auto", task: Task | str | None = None) -> Problem:
    """The search's :class:`Problem` again: base model from ``base.pt``, data, groups, costs.

    The model, data set and task are those the study's configuration records (``task``
    gives the task where the search was given it as an object); the weights must be
    the ones it was searched on (their fingerprint is checked). Sampling bounds are
    not needed to rebuild a trial and are left wide open.
    """
    config = run.config
    task = _task(config.get("task"), task)
    data = load_data(config["dataset"], data_dir, download, seed=int(config.get("seed", 0)), task=task)
    base_file = run.folder / "base.pt"
    if not base_file.is_file():
        raise AutopruneError(f"{base_file} does not exist; pass --run-dir, the folder the search wrote")
    base = load_weights(_model(run.model, data), base_file)
    if fingerprint(base.state_dict()) != config.get("base_model"):
        raise AutopruneError(f"{base_file} holds other weights than study {run.name!r} was searched on")
    torch_device = resolve_device(device)
    base = base.to(torch_device).eval()
    groups = ChannelGroups(base, data.example_input(), importance=config.get("importance", "l1"),
                           ignore=task.keep,
                           base_model=config["base_model"], loss=task.batch_loss)
    costs = CostModel(groups)
    limits = parse_budget(config["budget"]).limits(costs.base)
    n = len(groups)
    outputs = teacher_outputs(base, data, run.folder / TEACHER_OUTPUTS, torch_device, config["base_model"],
                              quiet=True) if config.get("distill") else None  # the search's, where it distilled
    return Problem(base, data, groups, costs, limits, np.zeros(n), np.full(n, config.get("max_ratio", 0.9)),
                   np.zeros(n), evaluate(base, data.loader("val", 256), torch_device, task), torch_device,
                   teacher_outputs=outputs)


def _task(stored: str | None, given: Task | str | None) -> Task:
    """The study's task: the one given, else the one its configuration names (none: classification)."""
    if given is not None or stored is None:
        return load_task(given)
    if ":" not in stored:
        raise AutopruneError(f"the study was searched with task {stored!r} given as an object; pass it again "
                             "(export_trial(..., task=...)), or search with a --task file.py:name")
    return load_task(stored)


def _model(spec: str, data: Data) -> torch.nn.Module:
    try:
        return build_model(spec, data.num_classes, input_shape=data.input_shape)
    except AutopruneError as err:
        raise AutopruneError(f"cannot rebuild the study's model {spec!r} ({err}); a model passed to "
                             "search() as an object cannot be rebuilt from its name") from None


def list_studies(storage: str | None = None, root: str | Path = RESULTS) -> pd.DataFrame:
    """Every study in ``storage`` (default: each ``study.db`` under ``results/``) with its trials,
    budget and best validation accuracy.

    Example:
        >>> list_studies().columns.tolist()
        ['study', 'storage', 'trials', 'complete', 'budget', 'model', 'dataset', 'best_val_accuracy', 'best_trial']
    """
    folders = sorted({db.parent for pattern in ("*/study.db", "*/study.log") for db in Path(root).glob(pattern)})
    urls = [storage] if storage else [run_storage("", folder) for folder in folders]
    rows = []
    for url in urls:
        backend = quiet_storage(url)
        for summary in optuna.get_all_study_summaries(backend, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=backend)
            if "front_of" in study.user_attrs:  # a copy `autoprune pareto --optuna-study` made
                continue
            config = study.user_attrs.get("config", {})
            best = study.best_trial if finished(study) and len(study.directions) == 1 else None
            rows.append({"study": summary.study_name, "storage": url, "trials": len(study.trials),
                         "complete": finished(study), "budget": config.get("budget"),
                         "model": config.get("model"), "dataset": config.get("dataset"),
                         "best_val_accuracy": best.value if best else None,
                         "best_trial": best.number if best else None})
    return pd.DataFrame(rows, columns=["study", "storage", "trials", "complete", "budget", "model", "dataset",
                                       "best_val_accuracy", "best_trial"])

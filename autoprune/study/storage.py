"""Where a study lives: Optuna storages (databases, journal files), the stored
configuration a resume must match, and the sensitivity cells every worker shares.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.exc import SQLAlchemyError

from autoprune.errors import AutopruneError, one_line
from autoprune.study.workers import Worker


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: a database URL or a journal file ending in .log/.journal.

    Dead trials are found by :func:`recover` (process ids and heartbeats), the
    same way for every storage, so no Optuna heartbeat is configured here.
    """
    if url.startswith(("sqlite", "postgresql", "mysql")):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ImportError as err:
            raise AutopruneError(f"storage {url.split(':')[0]} needs a driver: {err}; "
                                 "for PostgreSQL pip install psycopg2-binary and write postgresql+psycopg2://…") from None
        except SQLAlchemyError as err:  # a malformed URL, a server that does not answer
            raise AutopruneError(f"cannot open storage {url.split('@')[-1]}: {one_line(err)}") from None
    if url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileSymlinkLock(url)
        _repair_journal(Path(url), lock)
        return optuna.storages.JournalStorage(JournalFileBackend(url, lock_obj=lock))
    raise AutopruneError(f"unknown storage {url!r}; use sqlite:///file.db, postgresql://…, "
                         "mysql://… or a journal file ending in .log")


def _repair_journal(path: Path, lock: Any) -> None:
    """Cut a line half-written by a killed process off the end of a journal file.

    Optuna appends whole lines under ``lock``; a kill in the middle of one would
    otherwise glue the next record onto it and make the journal unreadable.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    lock.acquire()
    try:
        text = path.read_bytes()  # Optuna reads the whole journal anyway
        if not text.endswith(b"\n"):
            with open(path, "rb+") as f:
                f.truncate(text.rfind(b"\n") + 1)
    finally:
        lock.release()


def open_study(name: str, storage: str, config: dict[str, Any], new: bool = False) -> optuna.Study:
    """Create the study, or resume it if its stored configuration matches ``config``."""
    backend = storage_for(storage)
    if new:
        try:
            optuna.delete_study(study_name=name, storage=backend)
        except KeyError:
            pass
    study = optuna.create_study(study_name=name, storage=backend, direction="maximize",
                                load_if_exists=True)
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
        study.set_metric_names(["val_accuracy"])
        return study
    differs = [f"{key} was {stored.get(key)!r}, now {config.get(key)!r}"
               for key in sorted(set(stored) | set(config)) if stored.get(key) != config.get(key)]
    if differs:
        raise AutopruneError(f"study {name!r} was made with another configuration ({'; '.join(differs)}); "
                             "run it as it was, pass --new-study to start it afresh, or pick another --study")
    return study


def stored_config(name: str, storage: str) -> dict[str, Any] | None:
    """The configuration study ``name`` was made with (None: no such study in ``storage`` yet). Makes
    nothing: a storage file that is not there holds no study."""
    if not storage.startswith(("postgresql", "mysql")) and not Path(storage.removeprefix("sqlite:///")).is_file():
        return None
    try:
        study = optuna.load_study(study_name=name, storage=storage_for(storage))
    except KeyError:
        return None
    return study.user_attrs.get("config")


class SharedTable:
    """Sensitivity cells kept on the study itself, one system attribute per cell.

    Every worker, on this machine or another, reads the cells already measured
    and adds the ones it measures, so a scan is done once per study.

    Example:
        >>> SharedTable(optuna.create_study()).rows()
        []
    """

    PREFIX = "autoprune:sensitivity:"

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def _attrs(self) -> dict[str, Any]:
        return self.study._storage.get_study_system_attrs(self.study._study_id)

    def rows(self) -> list[dict]:
        return [value for key, value in self._attrs().items() if key.startswith(self.PREFIX)]

    def add(self, row: dict) -> None:
        key = self.PREFIX + self._cell(row["base_model"], row["importance"], row["group"], row["ratio"])
        if key not in self._attrs():  # the first measurement stays: every worker sees the same table
            self.study._storage.set_study_system_attr(self.study._study_id, key, row)

    def claim(self, base_model: str, importance: str, group: str, ratio: float) -> bool:
        """Claim a cell to measure; False if another worker claimed it first."""
        key = "autoprune:claim:" + self._cell(base_model, importance, group, ratio)
        me = asdict(Worker.me())
        if key not in self._attrs():
            self.study._storage.set_study_system_attr(self.study._study_id, key, me)
        return self._attrs()[key] == me  # two at once: the last write holds, and all read the same

    @staticmethod
    def _cell(base_model: str, importance: str, group: str, ratio: float) -> str:
        return f"{base_model}:{importance}:{group}:{float(ratio):.6g}"

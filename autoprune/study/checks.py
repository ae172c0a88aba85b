"""Refuse bad input before anything is written: the run folder, the storage URL (the numbers:
:meth:`autoprune.options.SearchOptions.check`).

A search checks all of these before it creates a file, so a mistake never leaves
a half-made run behind (a study configuration holding the bad value would refuse
the corrected rerun) and never touches another study's results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autoprune.errors import AutopruneError, one_line
from autoprune.files import sweep, write_json

RUN_FILE = "run.json"  # names the study a run folder belongs to
STORAGE_USAGE = "write it as sqlite:///path/study.db, postgresql+psycopg2://user:password@host:port/db, " \
                "mysql://… or a journal file ending in .log"


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Refuse a folder that cannot be made or written, without making it."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise AutopruneError(f"{flag} {folder} cannot be made: {existing} is a file; pass another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AutopruneError(f"{flag} {folder} cannot be written ({existing} is read-only); pass another {flag}")


def check_storage(url: str) -> None:
    """Refuse a storage URL that cannot be read, lacks its driver or whose server does not answer."""
    if url.endswith((".log", ".journal")):
        check_writable(Path(url).parent, "--storage")
        return
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        raise AutopruneError(f"unknown storage {url!r}; {STORAGE_USAGE}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise AutopruneError(f"cannot read storage URL {url!r}; {STORAGE_USAGE}") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise AutopruneError(f"storage {url!r} names no file; {STORAGE_USAGE}")
        check_writable(Path(parsed.database).parent, "--storage")
        return
    _connect(parsed)


def _connect(parsed) -> None:
    """Open one connection to a database server, to refuse it now rather than after the base is trained."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    shown = parsed.render_as_string(hide_password=True)
    try:
        engine = create_engine(parsed)
    except ImportError as err:
        hint = ("; SQLAlchemy's default for postgresql:// is psycopg 3: write postgresql+psycopg2://… to use "
                "psycopg2" if parsed.get_backend_name() == "postgresql" else "")
        raise AutopruneError(f"storage {shown} needs a driver that is not installed ({err}){hint}") from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        raise AutopruneError(f"cannot open storage {shown}: {one_line(err)}") from None
    finally:
        engine.dispose()


def check_run(out: Path, study: str, storage: str) -> None:
    """Refuse, before anything is written, a run folder or storage the search cannot use."""
    check_owner(out, study)
    check_writable(out)
    check_storage(storage)


def run_owner(out: Path) -> str | None:
    """The study whose results a run folder holds (None: a new folder, or no study finished there)."""
    for name in (RUN_FILE, "summary.json"):  # summary.json: folders written before run.json existed
        path = out / name
        if path.is_file():
            try:
                owner = json.loads(path.read_text()).get("study")
            except (OSError, ValueError, AttributeError):
                continue
            if owner:
                return str(owner)
    return None


def check_owner(out: Path, study: str) -> None:
    """Refuse a second study in a run folder: its model, plan, summary and checkpoints would be overwritten."""
    owner = run_owner(out)
    if owner is not None and owner != study:
        raise AutopruneError(f"{out} holds the results of study {owner!r}; pass another --out for study "
                             f"{study!r} (its files would overwrite the other's)")


def claim_run(out: Path, study: str) -> None:
    """Make the run folder and record which study it belongs to; call it just before the first write."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_FILE).is_file():
        write_json(out / RUN_FILE, {"study": study})
    sweep(out)  # temporary files of a killed run

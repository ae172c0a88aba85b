"""``BENCHMARKS.md``: one file several benchmark commands write, each into its own sections.

``bench`` rewrites the file whole and keeps the sections the others own
(:func:`own_sections`); ``bench-latency`` replaces its sections in place (:func:`update_section`).
"""

from __future__ import annotations

from pathlib import Path

from autoprune.files import atomic_path


def section(heading: str, text: str, columns: list[str]) -> list[str]:
    """A ``BENCHMARKS.md`` section's heading, explanation and table header."""
    return [heading, "", text, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


HEADINGS = ("## Does the latency predictor predict?", "## Is a latency budget worth it?")  # the sections bench-latency owns
# Sections other benchmarks write into the same BENCHMARKS.md (bench --task, into its own --out, then copied in).
KEPT = ("## Segmentation at equal wall time (a user's task)",)


def own_sections(path: Path) -> list[str]:
    """The sections of ``BENCHMARKS.md`` that ``bench-latency`` (and :data:`KEPT`'s writers) wrote, as they
    stand (``bench`` keeps them)."""
    lines = path.read_text().splitlines() if path.is_file() else []
    kept, mine = [], False
    for line in lines:
        if line.startswith("## ") or line.startswith("# "):
            mine = line in HEADINGS or line in KEPT
        if mine:
            kept.append(line)
    return kept + [""] * bool(kept)


def update_section(path: Path, lines: list[str], made_by: str) -> None:
    """Put ``lines`` (a section, its ``## `` heading first) into the markdown file at ``path``, in place
    of the section of that heading or at the end: ``BENCHMARKS.md`` keeps what ``bench`` wrote."""
    heading = lines[0]
    section = [heading, "", f"Made by: `{made_by}`", *lines[1:]]
    old = path.read_text().splitlines() if path.is_file() else ["# Benchmarks", ""]
    if heading in old:
        start = old.index(heading)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = old[:start] + section + old[end:]
    else:
        new = old + [""] * (old[-1:] != [""]) + section
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(new).rstrip("\n") + "\n")

"""Griffe extension for the API pages: autoprune's docstrings as mkdocstrings reads them.

- A Google-style ``Example:`` section is read as ``Examples:``. autoprune's docstrings head their
  doctests ``Example:`` (Napoleon reads both spellings); griffe reads only ``Examples:`` as
  doctest code and renders ``Example:`` as Markdown, where ``>>>`` becomes a quote and
  ``x["a"]["b"]`` a broken link.
- Sphinx roles (``:class:`~autoprune.plan.Plan```) become code spans (``Plan``): Markdown has no
  roles, and a link to a module path would tie the pages to where a name lives today.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class Docstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_role, text)

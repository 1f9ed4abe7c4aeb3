"""The modules whose METHODS make up the method table, imported once on first use."""

from __future__ import annotations

import importlib

MODULES = (
    "jaxmerge.methods.task_arithmetic",
)

_loaded = False


def load() -> None:
    global _loaded
    if _loaded:
        return
    from jaxmerge.methods._table import register

    _loaded = True
    for name in MODULES:
        register(*importlib.import_module(name).METHODS)

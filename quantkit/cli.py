"""The ``quantkit`` command line: a thin layer over :mod:`quantkit.api`.

Each sub-command is one module in ``quantkit/commands/`` exposing ``register(subparsers)``;
adding a command touches no other file. User errors print one line (no traceback), exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from .errors import QuantkitError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one ``quantkit: error:`` line (exit 2) as every other error."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"quantkit: error: {sub}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands

    p = _Parser(prog="quantkit", description="Post-training quantization for Hugging Face causal LMs.")
    p.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        from .models.integrity import allow_missing

        with allow_missing(getattr(args, "allow_missing", None)):  # --allow-missing PATTERN (quantize/run/eval)
            return int(args.func(args) or 0)
    except QuantkitError as e:
        print(f"quantkit: error: {e}", file=sys.stderr)
        from .api import exit_if_distributed

        exit_if_distributed(2)  # under torchrun: do not wait on a group that failed
        return 2
    except KeyboardInterrupt:
        print("quantkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

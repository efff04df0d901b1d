"""`lmlab hooks list`: argparse for what hooks.listing prints."""

from __future__ import annotations

import argparse
from typing import Any

from lmlab.hooks.inventory import hooks_list


def cmd_hooks_list(args: argparse.Namespace) -> None:
    print(hooks_list(args.config, getattr(args, "set", None) or []))


def add_commands(subparsers: Any) -> None:
    """Add `hooks list` to the top-level subparsers of `lmlab`."""
    s = subparsers.add_parser(
        "hooks", help="list hook points and built-in hooks",
        description="What an experiment can touch: the model's hook points (matched by the "
                    "'at' globs of the config's hooks section) and every hook by kind.")
    hs = s.add_subparsers(dest="hooks_command", required=True, metavar="ACTION")
    h = hs.add_parser("list", help="the points of a config's model and every hook with its "
                                   "parameters",
                      description="The hook points of the model a config builds, and every "
                      "registered hook (built-in and the config's plugins) with its parameters.")
    h.add_argument("--config", help="a YAML file or ready config (default: the default "
                                    "config); its plugins are loaded so their hooks are listed "
                                    "too")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.n_layer=2")
    h.set_defaults(func=cmd_hooks_list)

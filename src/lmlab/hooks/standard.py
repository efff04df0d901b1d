"""The built-in hooks: importing this module registers them all (their decorators do).

Imported statically, never by name, so import-linter sees the whole graph:
registry <- forward, backward, rules, update, aux <- standard <- plugins, cli.
A new built-in module of hooks is one more import here.
"""

from lmlab.hooks import aux, backward, forward, rules, update

MODULES = (forward, backward, rules, update, aux)

"""Training: the run's state and checkpoint (state), one step (step), what watches a run
(observers), the loop (loop), optimizers and the lr schedule (optim), distribution
(distributed), telemetry and TensorBoard. Checkpoint files are written and read in
lmlab.model.checkpoint; devices and dtypes are lmlab.device.

`lmlab.train(config, overrides)` calls this package: it is the API's `lmlab.api.train`.
The import system binds this package to the name `train` on `lmlab` whenever any
`lmlab.train.*` module is imported, so a function of that name on `lmlab` would be
replaced; the package itself is made callable instead.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from lmlab.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

"""`python -m lmlab.cli ...` == `lmlab ...` (the sweep executors start runs this way)."""

import sys

from lmlab.cli import main

sys.exit(main())

"""``python -m hat``: the ``hat`` command, also for ``torchrun -m hat index build ...``."""

import sys

from hat.cli import main

sys.exit(main())

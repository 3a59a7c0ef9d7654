"""``python -m hat``: the ``hat`` command, also for ``torchrun -m hat index build ...``.

Under torchrun, ``record`` writes a rank's uncaught error where the launcher finds it, so the
launcher's failure report names the rank and shows its traceback.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from hat.cli import main

sys.exit(record(main)())

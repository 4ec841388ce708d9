"""dsincubate: Deep Incubation (divide a ViT into K modules, incubate each inside a frozen meta model, assemble,
fine-tune) and its E2E baseline on DeepSpeed engines. Entry point: the `dsincubate` command (dsincubate.cli)."""

import time as _time

__version__ = "0.1.0"

# When this process began running dsincubate (before torch, DeepSpeed and the data are imported): a run's record
# carries it as `process_started_at`, so a test can tell jobs that were launched together from jobs run one after
# another, however long each one's imports and set-up take on a loaded machine.
PROCESS_STARTED_AT = _time.time()

"""Every job kind the workbench runs; the worker and every submitter import this one module.

`python -m jobs.worker --modules workbench.job_kinds` — registering happens at import time.
"""

import workbench.evaluate  # noqa: F401  "evaluate": accuracy vs BF16 per variant and policy
import workbench.quant.jobs  # noqa: F401  "quantize": quantize-and-merge into one checkpoint

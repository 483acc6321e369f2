"""cropmap: wall-to-wall crop maps from multi-modal Earth-observation stacks.

The package holds all logic of the Snakemake pipeline; rules in ``workflow/rules`` only call
``python -m cropmap <stage> ...``. Nothing is computed at import time.
"""

__version__ = "0.1.0"

"""The ``retrbench`` command line: the only place that prints.

Each subcommand is an entry of the :data:`COMMANDS` registry (one module per group:
``run.py`` for run / extract-style commands, ``listing.py`` for models / datasets, ``report.py``
for sweep / table / plot, ``download.py``, ``train.py``); :func:`main` builds only the parser
of the command asked for, so ``retrbench --help`` imports no torch.

Exit codes: 0 success; 1 the command failed (one line on stderr, the traceback with ``-vv``);
2 bad usage (unknown option, name or parameter; nothing was computed); 130 interrupted (Ctrl-C).
"""

from .main import COMMANDS, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, Command, UsageError, build_parser, main

__all__ = ["COMMANDS", "Command", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "UsageError", "build_parser", "main"]

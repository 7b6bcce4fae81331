"""Command line: ``python path/to/likeness models list|verify|fetch ID`` and ``... run WORKFLOW.json``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bootstrap import load_pack  # noqa: E402

load_pack(run_init=False)
from likeness.cli.main import main  # noqa: E402

sys.exit(main())

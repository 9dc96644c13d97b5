"""`python search/report.py RUN_DIR [flags]`: a search's frontier table and plot, as run from the
repository (the code is ccpcsa.search.report; `ccpcsa report` is the same)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccpcsa.search.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""`python search/run.py [flags]`: the search's entry, as `ray job submit -- python search/run.py`
runs it from the repository (the code is ccpcsa.search.run; `ccpcsa search` is the same)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccpcsa.search.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

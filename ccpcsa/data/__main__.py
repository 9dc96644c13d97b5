import sys

from ccpcsa.data.cli import main

sys.exit(main())

import sys

from fusedgpt.cli import main

sys.exit(main())

"""`python -m gcvit.cli`: the `gcvit` command."""

import sys

from gcvit.cli import main

sys.exit(main())

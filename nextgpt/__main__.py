"""`python -m nextgpt` runs the `nextgpt` command (the build's worker processes use this form, so
they run the same interpreter as their parent)."""

import sys

from nextgpt.cli import main

sys.exit(main())

"""`python -m lorakit.cli ...` (how torchrun starts the training processes)."""

import sys

from .app import main

sys.exit(main())

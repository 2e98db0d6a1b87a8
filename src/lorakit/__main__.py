"""`python -m lorakit ...`: the `lorakit` command (e.g. `python -m lorakit serve --model BASE`)."""

import sys

from .cli.app import main

sys.exit(main())

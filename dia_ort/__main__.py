"""`python -m dia_ort` is the `dia-ort` command."""

import sys

from dia_ort.cli import main

sys.exit(main())

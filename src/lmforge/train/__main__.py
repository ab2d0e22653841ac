"""`python -m lmforge.train --config FILE.yaml --out DIR [--section.key=value ...]` (also under torchrun -m)."""

import sys

from lmforge.train.cli import main

sys.exit(main())

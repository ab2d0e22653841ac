import sys

from lmforge.serve.cli import main

sys.exit(main())

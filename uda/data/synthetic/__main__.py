"""``python -m uda.data.synthetic``: the generator's command line (``make clean-data`` runs ``--clean``)."""

import sys

from .cli import main

sys.exit(main())

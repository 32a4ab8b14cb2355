"""``python -m uda.data.synthetic``: the generator's command line (``make clean-data`` uses ``--clean``)."""

import sys

from .street import main

sys.exit(main())

"""``python -m deconvlab``: the ``deconvlab`` command."""

import sys

from deconvlab.cli import main

sys.exit(main())

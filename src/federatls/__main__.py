"""``python -m federatls``: the federatls command."""

import sys

from ._cli import main

sys.exit(main())

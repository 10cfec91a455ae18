"""``python -m edgeq.deploy``: the same as the ``edgeq-deploy`` command."""

import sys

from edgeq.deploy.cli import main

sys.exit(main())

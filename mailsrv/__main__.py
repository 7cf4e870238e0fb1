"""``python -m mailsrv``: the admin command, as the ``mailsrv`` script."""

import sys

from mailsrv.cli import main

sys.exit(main())

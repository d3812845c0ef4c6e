"""`python -m fileserver_ctl` is `fsctl`."""

import sys

from .cli import main

sys.exit(main())

"""`python -m fileserver_ctl` is `fsctl`."""

import sys

from .launch import main

sys.exit(main())

"""``python -m horizon_dns``: the same as the ``horizon-dns`` command."""

import sys

from horizon_dns.cli import main

sys.exit(main())

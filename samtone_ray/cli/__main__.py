"""``python -m samtone_ray.cli``: how submitted jobs run the command on a cluster node."""

import sys

from samtone_ray.cli import main

sys.exit(main())

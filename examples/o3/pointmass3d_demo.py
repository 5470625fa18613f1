"""The O(3) policy demo (``streamtx o3-demo``): a 3-D point mass reaching 3-D targets, an O(3)-equivariant policy
against a plain one of the same size, both trained on targets from a cone of directions, evaluated on and off it, and
served by the daemon. Arguments are ``streamtx o3-demo``'s (``--cone 30``, ``--workdir DIR``, ...)."""

import sys

from streamtx.apps.o3_demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

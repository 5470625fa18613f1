"""gymnasium Reacher-v5 served through the streamtx daemon with a mirror-equivariant policy."""

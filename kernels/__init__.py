"""GPU kernels behind the plugins."""

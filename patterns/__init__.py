"""The fusion library."""

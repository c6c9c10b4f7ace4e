"""horizon-dns: a split-horizon DNS resolver for overlay networks."""

__version__ = "0.1.0"

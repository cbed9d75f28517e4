"""avcloud: cloud-augmented perception middleware for autonomous vehicles.

This package is the kernel shared by every other package (types, errors, config,
wire protocol, clock, model runtime, link model) and, at the top, the CLI and the
replay/profiling orchestrators.
"""

__version__ = "0.1.0"

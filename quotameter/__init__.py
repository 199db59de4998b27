"""quotameter core: event schema, configuration, policy and pricing (no I/O).

The CLI (`cli.py`) and the embedded-stack launcher (`embedded/`) sit at the
edge of this package and wire `gateway_shim` and `pipeline` together.
"""

__version__ = "0.1.0"

"""nftrace: why was my packet dropped? Trace one flow through the firewall, rule by rule."""

__version__ = "0.1.0"

"""Configuration: strict YAML in, built zones and stages out.

The loader is :mod:`horizon_dns.config.model`; nothing is imported here, so a
stage module can be imported on its own (``config.model`` imports the stages).
"""

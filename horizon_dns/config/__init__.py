"""Configuration: strict YAML in, built zones and stages out."""

from horizon_dns.config.model import Config, ListenAddress, describe, load_config

__all__ = ["Config", "ListenAddress", "describe", "load_config"]

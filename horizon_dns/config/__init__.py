"""Configuration: strict YAML in, built zones and stages out.

:mod:`~horizon_dns.config.load` loads (``load_config``); :mod:`~horizon_dns.config.schema`
is what a loaded configuration holds; :mod:`~horizon_dns.config.server` reads the
server file's settings and :mod:`~horizon_dns.config.rules` the zones and aliases;
:mod:`~horizon_dns.config.source` is the strict YAML reader they share. Nothing is
imported here, so a stage module can be imported on its own (the loader imports
the stages).
"""

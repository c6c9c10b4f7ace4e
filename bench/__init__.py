"""The horizon-dns benchmark against dnsmasq and unbound (issue #7).

``python -m bench`` (from the repository root) starts dnsmasq, unbound and several
horizon-dns variants on 127.0.0.1, drives each with dnsperf in interleaved rounds,
and writes the medians to ``bench/RESULTS.md``. ``python -m bench --help`` lists
the options; the method is described at the top of ``bench/__main__.py`` and in
the RESULTS.md it writes.
"""

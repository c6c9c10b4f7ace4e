"""The horizon-dns benchmark against dnsmasq and unbound (issue #7).

``python -m bench`` (from the repository root) starts dnsmasq, unbound and several
horizon-dns variants on 127.0.0.1, drives each with dnsperf in interleaved rounds,
and writes the medians to ``bench/RESULTS.md``. ``python -m bench --help`` lists
the options; the method is described at the top of ``bench/__main__.py`` and in
the RESULTS.md it writes.

Its modules, each importing only modules listed before it:

* ``queries``: the query names, dnsperf query files, a one-query UDP probe;
* ``procfs``: a process's CPU seconds and VmRSS/VmHWM, from /proc;
* ``servers``: the servers under test, their configs, starting and stopping them;
* ``dnsperf``: one dnsperf run and its figures (``Run``), CPU per query included;
* ``scenarios``: the scenarios, their (scenario, server) cells, in-round ratios;
* ``memory``: the memory test (a horizon-dns with 100k cached names);
* ``machine``: the machine and program versions the report names;
* ``report``: the markdown tables, issue #7's targets, RESULTS.md;
* ``benchmark``: ``run``, the whole benchmark once the options are parsed;
* ``__main__``: the command line.

``python -m bench.micro`` and ``python -m bench.listener`` are separate, smaller
measurements (see their docstrings).
"""

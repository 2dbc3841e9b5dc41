"""The web dashboard: one more reader and writer of the ledger and of request files.

`dropmesh serve` runs it alone; `dropmesh run` starts it beside the daemon as a separate,
supervised child process (daemon/web/supervisor.py). It never talks to the daemon.
"""

"""The `toe` command line: one module per command, the console entry point on top.

app       the parser and `main` (the console script `toe = offload_daemon.cli:main`)
up_down   toe up, toe down
run       toe run
stat_view toe stat (also --watch)
demo      toe demo
(`toe bench` is bench.cli; what the commands and bench share is offload_daemon.client.)
"""

from offload_daemon.cli.app import main

__all__ = ["main"]

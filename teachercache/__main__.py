"""``python -m teachercache``: the same command line as ``teachercache``."""

from teachercache.cli import main

main()

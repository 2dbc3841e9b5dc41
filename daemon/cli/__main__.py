"""`python -m daemon.cli ...`, the same as the `dropmesh` console script."""

from daemon.cli import main

main()

"""`python -m llamaops` is the `llamaops` command."""

from llamaops.cli import main

main()

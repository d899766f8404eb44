"""`python -m node.cli` runs the `umm` command line."""

from node.cli import main

main()

"""``python -m loomc``: the loomc command line."""

from loomc.cli import main

main()

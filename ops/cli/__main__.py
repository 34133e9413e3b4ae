"""`python -m ops.cli <command>`: how `msgcore up`, ops/stack.py and the tests start components."""

from ops.cli import main

main()

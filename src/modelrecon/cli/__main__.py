"""`python -m modelrecon.cli`: the same as the `modelrecon` command."""

from modelrecon.cli import main

main()

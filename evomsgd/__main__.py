"""`python -m evomsgd` runs the CLI."""

from evomsgd.cli import main

main()

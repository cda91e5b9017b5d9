"""`python -m evomsgd` runs the CLI."""

from evomsgd.cli.main import main

main()

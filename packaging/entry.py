"""Entry script of the frozen executable: the same CLI as the `evomsgd` console script."""

from evomsgd.cli.main import main

main()

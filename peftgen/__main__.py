"""``python -m peftgen`` runs the CLI."""

from peftgen.cli import main

main()

"""``python -m difffeat``: the command line (also what ``torchrun -m difffeat`` runs)."""

from difffeat.run.cli import app

app()

"""``python -m difffeat``: the command line (also what ``torchrun -m difffeat`` runs)."""

from difffeat.cli import app

app()

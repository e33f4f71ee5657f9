"""`python -m qscore` runs the command line (how `qscore up` starts its services)."""

from qscore.cli.app import app

app(prog_name="qscore")

"""The command line: app.py registers every command; options.py is the only reader of
flags and QSCORE_* variables."""

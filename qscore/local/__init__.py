"""The local one-machine fleet: child processes, embedded servers, `qscore up`."""

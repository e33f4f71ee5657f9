"""The `qscore` command line: the one place that registers every command.

Each command lives in the module of its kind (rescore, engine, client, services, fleet,
status); flags and QSCORE_* variables are read only through qscore.cli.options."""

from __future__ import annotations

import typer

from qscore.cli.client import consume, publish, topics_app
from qscore.cli.engine import engine_app
from qscore.cli.fleet import up
from qscore.cli.options import kafka_command, service_command
from qscore.cli.rescore import merge, rescore
from qscore.cli.services import tokenizer, worker
from qscore.cli.status import status

app = typer.Typer(help="qscore: score search queries with quantized BERT-class engines.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def version() -> None:
    """Print the qscore version."""
    from importlib.metadata import version as dist_version

    print(dist_version("qscore"))


app.command()(kafka_command(rescore))
app.command()(merge)
app.add_typer(engine_app, name="engine")
app.command()(version)
app.command("publish")(kafka_command(publish))
app.command("consume")(kafka_command(consume))
app.add_typer(topics_app, name="topics")
app.command()(kafka_command(service_command(worker)))
app.command()(kafka_command(service_command(tokenizer)))
app.command()(up)
app.command()(kafka_command(status))

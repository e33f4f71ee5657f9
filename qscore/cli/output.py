"""What every command prints besides its results: errors (exit 2), summaries, progress bars.

stdout carries only machine-readable output; everything here goes to stderr."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.table import Table
from rich.text import Text

err = Console(stderr=True)


def fail(message: object, code: int = 2) -> NoReturn:
    """Print `message` as an error and end the command with exit `code`."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def print_summary(title: str, summary: dict[str, object]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    err.print(table)


class RateColumn(ProgressColumn):
    """`N unit/s` over the task's elapsed time."""

    def __init__(self, unit: str = "lines") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time or task.elapsed
        if not elapsed or not task.completed:
            return Text(f"-- {self.unit}/s", style="cyan")
        return Text(f"{task.completed / elapsed:,.0f} {self.unit}/s", style="cyan")

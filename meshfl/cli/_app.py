"""What every command shares: the ``main`` group, the --home and --json options, output, errors.

User errors (any MeshflError) become one line on stderr, ``meshfl: error: ...``, and exit code 1;
a traceback means a bug in meshfl, not a mistake of the user.
"""

from __future__ import annotations

import datetime
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import orjson

from .. import __version__
from ..errors import ConfigError, MeshflError
from ..home import Home

DEFAULT_HOME = "./meshfl-home"


class UserError(click.ClickException):
    """Printed as one ``meshfl: error: ...`` line on stderr."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"meshfl: error: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshflError as exc:
            raise UserError(exc.message) from None
        except OSError as exc:  # a folder that cannot be created, a file that cannot be read
            where = f": {exc.filename}" if exc.filename else ""
            raise UserError(f"{exc.strerror or exc}{where}") from None
        except KeyboardInterrupt:
            raise UserError("interrupted", exit_code=130) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="meshfl",
                      message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True,
              help="Log more (-v: info, -vv: debug) to stderr.")
def main(verbose: int) -> None:
    """meshfl: federated learning where data stays on its node and models travel.

    A node keeps data and trains on it; a researcher runs experiments across nodes. Each has a
    home folder (--home, or the MESHFL_HOME environment variable, default ./meshfl-home) that
    holds its keys, settings and records. Start with `meshfl init`.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def home_option(fn: Callable) -> Callable:
    return click.option(
        "--home", "home", type=click.Path(file_okay=False, path_type=Path),
        envvar="MESHFL_HOME", default=DEFAULT_HOME, show_default=True, show_envvar=True,
        help="The home folder of this node or researcher.",
    )(fn)


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON (for scripts) instead of text.")(fn)


@contextmanager
def open_home(path: Path, role: str | None = None) -> Iterator[Home]:
    """The home at `path`, closed afterwards; ConfigError when it has another role."""
    with Home.open(path) as home:
        if role is not None and home.config.role != role:
            raise ConfigError(f"this command needs a {role} home; {home.path} is a "
                              f"{home.config.role} home", code="wrong_role")
        yield home


def emit_json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                            default=str).decode())


def when(ts: float | None) -> str:
    """A local, readable time for a stored epoch timestamp."""
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: list[list[Any]], header: list[str]) -> None:
    """Print `rows` as aligned columns under `header`."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

"""What every EdgeTune command line shares: settings that fail with one line that says what is
wrong (exit 2), and typed errors mapped to exit codes, never a traceback for a user's mistake."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, TypeVar

import typer

S = TypeVar("S")
EXIT_INPUT = 2  # a bad setting or input: nothing started, nothing stored


def version_line(about: Callable[[], str] | None = None) -> str:
    """'edgetune 0.1.0 (wire protocol 2)': the installed release, and what `about` adds."""
    from common.release import release

    v = release() or "(not installed: run scripts/install)"
    return f"edgetune {v}" + (f" ({about()})" if about is not None else "")


def new_app(help: str, about: Callable[[], str] | None = None) -> typer.Typer:
    """A command group (`edgetune-agent run`, `edgetune-aggregator run`, ...): subcommands stay
    subcommands even when there is only one. `--version` prints `version_line(about)`."""
    app = typer.Typer(add_completion=False, help=help)

    def _version(value: bool) -> None:
        if value:
            typer.echo(version_line(about))
            raise typer.Exit(0)

    @app.callback()
    def main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                          help="print the version (and the wire protocol's) and exit")) -> None:
        pass

    return app


def fail(error: BaseException | str, code: int) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code)


def cli_settings(cls: type[S], config: Path | None, **overrides: Any) -> S:
    """common.settings.load_settings for a command: a bad value prints its field and variable and exits 2."""
    from common.settings import SettingsError, load_settings

    try:
        return load_settings(cls, config, **overrides)
    except SettingsError as e:
        fail(e, EXIT_INPUT)


@contextlib.contextmanager
def exit_codes(codes: Mapping[type[BaseException], int]) -> Iterator[None]:
    """Turn the listed error types into 'error: ...' and their exit code."""
    try:
        yield
    except tuple(codes) as e:
        fail(e, next(code for kind, code in codes.items() if isinstance(e, kind)))

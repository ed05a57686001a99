"""The `unclip` command: a thin Typer layer over `unclip_cli.engine`.

Each command group lives in its own module and registers itself on `app` here. Known errors become one
line `Error: ...` (plus a hint) on stderr with exit code 1; usage errors keep Typer's exit code 2;
Ctrl-C exits 130. Set UNCLIP_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="unclip",
    help="Creative image operations with unCLIP (the DALL-E 2 architecture): generate, vary, blend, edit, nudge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`. A module that is not written yet is
    # simply absent; every command module imports `app` from here.
    import importlib

    for name in ("images", "info", "data", "train", "eval"):
        try:
            importlib.import_module(f"unclip_cli.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"unclip_cli.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map errors to exit codes."""
    from unclip_cli.errors import UnclipError

    _register()
    try:
        app(args=argv, prog_name="unclip", standalone_mode=False)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    except UnclipError as e:
        if os.environ.get("UNCLIP_DEBUG") == "1":
            raise
        print(f"Error: {e}", file=sys.stderr)
        if e.hint:
            print(f"Hint: {e.hint}", file=sys.stderr)
        sys.exit(1)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors and aborts come through here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.Abort):
            print("Interrupted.", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if os.environ.get("UNCLIP_DEBUG") == "1":
            raise
        print(f"Error: {type(e).__name__}: {e}", file=sys.stderr)
        print("Hint: this is a bug in unclip; rerun with UNCLIP_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        sys.exit(1)

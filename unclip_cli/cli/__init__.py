"""The `unclip` command: a thin Typer layer over `unclip_cli.engine`.

Each command group lives in its own module and registers itself on `app` here. Known errors become one
line `Error: ...` (plus a hint) on stderr with exit code 1; usage errors (Typer's own, and `UsageError`: an option's
value out of range, an argument missing) exit 2; Ctrl-C exits 130. Set UNCLIP_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings

import typer

# Names every image command (cli/images.py's INPUTS; a test checks that they agree)
HELP = "Creative image operations with unCLIP (the DALL-E 2 architecture): generate, vary, blend, edit, nudge, mix, compose."

app = typer.Typer(
    name="unclip",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Each command (or group) and the module that registers it, so that the console script can import only the one it
# runs (main); a test checks this against what the modules register. Imported in this order, they are listed so in
# `unclip --help` (commands, then groups).
COMMANDS = {"generate": "images", "vary": "images", "blend": "images", "edit": "images", "nudge": "images", "mix": "images",
            "compose": "images", "info": "info", "concepts": "concepts", "data": "data", "train": "train", "eval": "eval",
            "serve": "serve", "convert": "convert"}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))


def _flags_without_type_label() -> None:
    """Typer shows a type label for every option, `<bool>` on plain flags (--help, --json, --force...),
    where it says nothing a reader needs: flags show no label, as in click's own help."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)  # typer before 0.29 shows no label on flags
    if shown is None or getattr(shown, "_unclip", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich._unclip = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_type_label()

# Type labels as placeholders in capitals, the way the help's own words (--weights DIR, --from PNG) write them; a
# choice lists its literal values in lower case (auto|cpu|cuda). Typer 0.28 writes them as <int>, <str>, <path>.
_LABELS = {"int": "INT", "int range": "INT", "float": "FLOAT", "float range": "FLOAT", "str": "TEXT", "text": "TEXT",
           "path": "PATH", "filename": "FILE"}


def _plain_labels() -> None:
    """One style for every label in the help: INT, FLOAT, TEXT, PATH and a choice's values (Typer 0.28 mixes <int>
    with the DIR and PNG that unclip names itself), no type column for arguments (their name says it), and a usage
    line of plain names: `unclip convert karlo [OPTIONS] SRC`, not `{SRC}`; an image command's arguments unbracketed,
    as it needs them unless --from gives a recipe; other optional arguments in brackets, `[QUERY]`."""
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption.make_metavar, "_unclip", False):
        return
    option_metavar = TyperOption.make_metavar

    def make_option_metavar(self, ctx, *args, **kwargs):
        label = option_metavar(self, ctx, *args, **kwargs)
        if self.metavar is not None or not (label.startswith("<") and ">" in label):
            return label
        name, rest = label[1:].split(">", 1)
        return _LABELS.get(name, name if "|" in name else name.upper()) + rest

    def make_argument_metavar(self, ctx, *, usage: bool = False):
        name = self.metavar or (self.name or "").upper()
        name += "..." if self.nargs != 1 else ""
        needed = self.required or any("--from" in p.opts for p in ctx.command.params)
        return f"[{name}]" if usage and not needed else name

    for f in (make_option_metavar, make_argument_metavar):
        f._unclip = True
    TyperOption.make_metavar = make_option_metavar
    TyperArgument.make_metavar = make_argument_metavar
    # The help's type column of an argument: typer writes <str> or <path> when its type names no label
    types = sys.modules[next(c for c in TyperArgument.__mro__ if c.__name__ == "Parameter").__module__].types
    type_label = types.ParamType.get_metavar

    def get_metavar(self, param, ctx=None):
        return "" if getattr(param, "param_type_name", None) == "argument" else type_label(self, param, ctx)

    types.ParamType.get_metavar = get_metavar


_plain_labels()


def _version(value: bool) -> None:
    if value:
        from unclip_cli import __version__
        from unclip_cli.cli.info import shipped_set

        # the tool's version and the model set's (`unclip info` shows both): they differ and are often confused
        shipped = shipped_set()
        print(f"unclip {__version__} · " + (f"shipped model set {shipped}" if shipped else "no model set shipped"))
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                       help="Print the versions of unclip and its shipped model set.")) -> None:
    # no docstring: it would replace the app's help (HELP) in `unclip --help`
    return None


def _register(command: str | None = None) -> None:
    """Add the commands to `app` (by importing their modules, each of which imports `app` from here): only
    `command`'s module when it is one of COMMANDS, else all of them."""
    import importlib

    for name in (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES:
        importlib.import_module(f"unclip_cli.cli.{name}")


def _advice(e: BaseException) -> tuple[str, str] | None:
    """Known failures of the model run that deserve advice rather than a traceback: (message, hint)."""
    text = str(e)
    low = text.lower()
    if isinstance(e, MemoryError) or "out of memory" in low or "can't allocate memory" in low or type(e).__name__ == "OutOfMemoryError":
        return (
            "ran out of memory while running the model",
            "lower --batch-size (e.g. --batch-size 1), ask for fewer images with -n, use --quality fast, or try --device cpu",
        )
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map errors to exit codes."""
    from unclip_cli.errors import UnclipError, UsageError

    if argv is None:  # the console script, before torch is imported: how its threads wait (cli/load.py)
        from unclip_cli.cli.load import choose_wait_policy, keep_freed_memory

        # Python's cycle collector runs while torch is imported, three times over every object made so far, and finds
        # only leftovers of the imports: 0.24-0.25 s of collecting per command on the 2-core machine. It is paused while
        # the command's modules are imported, and what they made is then kept out of its later passes (issue 25).
        gc.disable()
        choose_wait_policy()
        keep_freed_memory()
        # It runs one command: when the first argument names it, only its module is imported and only its commands
        # built (0.05-0.1 s less, issue 25). Anything else (--help, --version, a misspelt name that Typer suggests
        # another for) needs them all, as does a program or test that passes argv.
        _register(sys.argv[1] if len(sys.argv) > 1 else None)
        gc.freeze()
        gc.enable()
    else:
        _register()
    for stream in (sys.stdout, sys.stderr):
        # A terminal or pipe that cannot encode a path or prompt shows it escaped instead of failing the run.
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    debug = os.environ.get("UNCLIP_DEBUG") == "1"
    if not debug and not sys.warnoptions and sys.stderr is sys.__stderr__:
        # Libraries' warnings (torch, numpy, Pillow) name their source lines and nothing a user can act on; unclip's
        # own warnings are its `Warning:` lines. UNCLIP_DEBUG=1 (or python -W) shows them. Only in a real process:
        # a program or test that runs `main` inside its own capture keeps its warnings.
        warnings.simplefilter("ignore")
    try:
        # Non-standalone mode returns the exit code of `typer.Exit` (Ctrl-C arrives as 130) instead of
        # exiting, and raises usage errors, so that all the mapping happens here.
        rc = app(args=argv, prog_name="unclip", standalone_mode=False)
    except KeyboardInterrupt:
        rc = 130
    except UnclipError as e:
        if debug:
            raise
        print(f"Error: {e}", file=sys.stderr)
        if e.hint:
            print(f"Hint: {e.hint}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except SystemExit:
        raise
    except Exception as e:
        # Recent Typer vendors its own copy of click, so click's usage errors are recognised by their shape.
        if isinstance(e, typer.Abort):
            rc = 130
        elif hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        elif isinstance(e, typer.Exit):
            sys.exit(e.exit_code)
        else:
            advice = _advice(e)
            if debug:
                raise
            if advice is not None:
                print(f"Error: {advice[0]}", file=sys.stderr)
                print(f"Hint: {advice[1]}", file=sys.stderr)
            else:
                print(f"Error: {type(e).__name__}: {e}", file=sys.stderr)
                print("Hint: this is a bug in unclip; rerun with UNCLIP_DEBUG=1 for the traceback and report it.", file=sys.stderr)
            sys.exit(1)
    if rc == 130:
        print("Interrupted.", file=sys.stderr)
    rc = rc if isinstance(rc, int) else 0
    if rc == 0 and argv is None:  # the console script, finished: nothing is left to tear down
        _exit_at_once()
    sys.exit(rc)


def _exit_at_once() -> None:
    """End a successful command's process without the interpreter's teardown, which after `import torch` costs
    0.3-0.7 s of CPU (measured, issue 25) and does nothing a finished command needs: its outputs are closed and in
    place, temporary folders removed, worker threads joined. Only the buffered output is left to flush."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with the stream closed (`unclip ... >&-`)
                stream.flush()
        except (OSError, ValueError):  # a closed pipe (`unclip ... | head`) has nobody left to read it
            pass
    os._exit(0)

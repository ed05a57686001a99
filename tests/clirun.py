"""Running `unclip ARGS` in-process, exactly as the console script does: exit code, stdout and stderr."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from typer.testing import CliRunner

from unclip_cli.cli import main


@dataclass
class Res:
    code: int
    out: str
    err: str


def cli(*args, env: dict | None = None) -> Res:
    """`unclip ARGS` under typer's CliRunner isolation (stdout and stderr apart, `env` set)."""
    with CliRunner().isolation(env=env) as (out, err, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        return Res(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"))

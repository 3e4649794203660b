"""The `ctxtune` command line (typer). Each command module registers its commands on `app`.

Run `ctxtune --help` for the list; every command has `--help` with an example.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.2x vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

app = typer.Typer(
    name="ctxtune",
    help="What context-based fine-tuning (prompts, soft prompts, prefixes, suffixes) can and cannot do.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ["train_cmds", "sweep", "reproduce", "check", "diagnose", "beyond", "construct", "bench", "export"]
for _name in COMMAND_MODULES:
    importlib.import_module(f"ctxtune.commands.{_name}").register(app)


def main() -> None:
    """Console entry point: usage errors become one line on stderr with exit code 2."""
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click_exc.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp"):
            sys.exit(0)
        hint = (
            f" (see 'ctxtune {exc.ctx.command_path.split(' ', 1)[1]} --help')"
            if exc.ctx and " " in exc.ctx.command_path
            else ""
        )
        print(f"error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

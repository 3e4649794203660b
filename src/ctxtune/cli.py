"""The `ctxtune` command line (typer). Each command module registers its commands on `app`.

Run `ctxtune --help` for the list; every command has `--help` with an example. `main` is the one
error boundary: whatever goes wrong becomes one `error: ...` line on stderr with exit code 2 (1 for a
failure during valid work, 130 for Ctrl-C); `ctxtune --debug ...` or CTXTUNE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from ctxtune.commands.common import report_error, set_debug

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


@app.callback()
def global_options(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (also CTXTUNE_DEBUG=1)."),
) -> None:
    """Options of every command (`--debug` may also follow the command name)."""
    set_debug(debug)


COMMAND_MODULES = ["train_cmds", "sweep", "reproduce", "check", "diagnose", "beyond", "construct", "bench", "export"]
for _name in COMMAND_MODULES:
    importlib.import_module(f"ctxtune.commands.{_name}").register(app)


def main() -> None:
    """Console entry point: any error becomes one line on stderr with its exit code."""
    set_debug(False)
    try:
        rc = app(args=debug_first(sys.argv[1:]), standalone_mode=False)
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
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: B036 - the boundary for errors outside a command's own
        sys.exit(report_error(exc))


def debug_first(args: list[str]) -> list[str]:
    """Move a `--debug` given after the command name to the front, where the global option lives
    (arguments after a `--` separator are left alone)."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]


if __name__ == "__main__":
    main()

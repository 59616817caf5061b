"""The entry point: parse, dispatch, and end every failure in one line (guard.py)."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

# Each module registers its commands on `app`; the help lists them in this order.
from dusa_cli.cli import data, run, report, bench  # noqa: F401  # isort: skip
from dusa_cli.cli.app import app
from dusa_cli.cli.guard import guarded
from dusa_cli.errors import ConfigError, DusaError, ExitCode


def main() -> None:
    # --debug may come anywhere (`dusa baseline … --debug`): it is taken out before Typer parses,
    # and the environment carries it to the processes of a --gpus run.
    if "--debug" in sys.argv[1:]:
        sys.argv = [arg for arg in sys.argv if arg != "--debug"]
        os.environ["DUSA_DEBUG"] = "1"
    guarded(_parse_and_dispatch)


def command() -> typer.core.TyperGroup:
    """The app as a Click command. Its help's second column says what each option takes, and
    Typer 0.29 fills it from the type where no metavar is set: every flag, --help too, showed
    `<bool>`, as if it took a value, and `report`'s directories `<list[Path]>`. Here a flag shows
    nothing, a choice its choices as our own metavars do (`dit|sit`, not `<dit|sit>`), and an
    argument of several values its metavar with `...` (`DIR...`). Typer's rich help also keeps a
    docstring's line breaks, which the terminal then wraps again: a command's help is joined into
    one line per paragraph."""
    root = typer.main.get_command(app)
    help_names = root.context_settings["help_option_names"]

    def plain(node: Any) -> None:
        if node.help:
            node.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in node.help.split("\n\n"))
        # A command makes its help option on first request and keeps it: made here, it can be changed.
        help_option = node.get_help_option(typer.Context(node, help_option_names=help_names))
        for param in [*node.params, help_option]:
            argument = isinstance(param, typer.core.TyperArgument)  # Typer ignores an argument's metavar there
            choices = getattr(param, "type_descriptor", None) and param.type_descriptor.choices
            if getattr(param, "is_flag", False):
                param.metavar = ""  # shown in place of the type
            elif choices and (argument or param.metavar is None):  # Typer's `<a|b>`
                shown = "|".join(str(getattr(choice, "value", choice)) for choice in choices)
                if argument:
                    param.display_type_rich = lambda ctx, shown=shown: shown
                else:
                    param.metavar = shown
            elif argument and param.nargs != 1:
                param.display_type_rich = lambda ctx, shown=f"{param.metavar}...": shown
        for child in getattr(node, "commands", {}).values():
            plain(child)

    plain(root)
    _fold_long_words()
    return root


def _fold_long_words() -> None:
    """Help text breaks a word longer than its column (`method.prior_checkpoint` in an 80-column
    terminal) onto the next line, where Typer's rich help cut it to `method.prior_che…`."""
    from rich.text import Text
    from typer import rich_utils

    make_text = rich_utils._make_rich_text
    if getattr(make_text, "folds", False):
        return

    def folding(**kwargs: Any) -> Any:
        text = make_text(**kwargs)
        if isinstance(text, Text):
            text.overflow = "fold"
        return text

    folding.folds = True  # type: ignore[attr-defined]
    rich_utils._make_rich_text = folding


def _parse_and_dispatch() -> None:
    """The app, with usage errors (unknown option, value out of range, bad choice) as one error
    line and exit 2, like a bad config: Typer would box them in a multi-line panel."""
    root = command()
    try:
        code = root.main(prog_name="dusa", standalone_mode=False)
    except typer.TyperException as failure:  # Typer's own Click: UsageError and its kin
        context = getattr(failure, "ctx", None)
        if type(failure).__name__ == "NoArgsIsHelpError":  # `dusa` alone: the help is printed already
            code = failure.exit_code
        elif context is None and failure.exit_code != ExitCode.USAGE:
            raise DusaError(failure.format_message()) from failure
        else:  # a usage error; the parser's own (`-c` without its value) come without a context
            message = failure.format_message().replace(": Value error, ", ": ")  # Typer's wording of a bad choice
            path = context.command_path if context else _command_path(root, sys.argv[1:])
            raise ConfigError(f"{message} (see '{path} --help')") from failure  # exit 2, as Click's
    if isinstance(code, int) and code:  # what a typer.Exit ended with
        sys.exit(code)


def _command_path(root: typer.core.TyperGroup, args: list[str]) -> str:
    """`dusa bench cls` for `bench cls --variant`: the command that the leading arguments name."""
    node, path = root, ["dusa"]
    for word in args:
        node = getattr(node, "commands", {}).get(word)
        if node is None:
            break
        path.append(word)
    return " ".join(path)

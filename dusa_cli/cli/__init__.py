"""The `dusa` command line: parse, validate, dispatch; work happens in engine/data/results.

    app.py     the Typer app, global options, what the command modules share
    run.py     baseline, adapt-cls, adapt-seg
    data.py    prepare-data, pretrain
    report.py  report
    bench.py   bench cls, bench seg
    main.py    the entry point: parsing, usage errors as one line
    guard.py   one error line and a meaningful exit code for every failure
"""

from dusa_cli.cli.main import command, main

__all__ = ["command", "main"]

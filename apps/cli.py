"""The `edge-duet` command. Each group of commands lives in its own module with a ``register(app)``
function; this file only assembles them. Command modules import their heavy dependencies lazily, so
`edge-duet --help` stays fast and works with only the runtime installed."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="edge-duet",
    help="Proactive video assistants on edge devices: export, quantize, run, serve, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version() -> str:
    """The installed distribution's version (pyproject.toml), or ``edge_duet.__version__`` from a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("edge-duet")
    except PackageNotFoundError:
        import edge_duet

        return getattr(edge_duet, "__version__", "unknown")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edge-duet {version()}")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True,
    ),
) -> None:
    """Proactive video assistants on edge devices: export, quantize, run, serve, evaluate, benchmark."""

COMMAND_MODULES = (
    "edge_duet.apps.cmd_export",  # make-checkpoint, export
    "edge_duet.apps.cmd_infer",  # infer
    "edge_duet.apps.cmd_run",  # run
    "edge_duet.apps.cmd_serve",  # serve
    "edge_duet.apps.cmd_eval",  # eval
    "edge_duet.apps.cmd_bench_data",  # make-benchmark
    "edge_duet.apps.cmd_train",  # train-demo
    "edge_duet.apps.cmd_train_rl",  # train-rl
    "edge_duet.apps.cmd_quant",  # quantize, compare, build-engines
    "edge_duet.apps.cmd_bench",  # bench
)

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _exc:
        if _exc.name != _name:  # a real missing dependency inside the module: surface it
            raise
        continue
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

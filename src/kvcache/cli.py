"""The ``kvcache`` command line: thin wrappers that parse arguments and call typed library functions."""

from __future__ import annotations

import typer

from kvcache.onnx.cli import app as onnx_app

app = typer.Typer(
    name="kvcache",
    help="KV-cache layouts, retention policies and ONNX KV-cache injection for LLM text generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(onnx_app, name="onnx")


@app.command()
def info(
    json_output: bool = typer.Option(False, "--json", help="Print one machine-readable JSON object."),
) -> None:
    """Show cache layouts, precisions, placements and policies (parameters, defaults, availability)."""
    import json

    from kvcache.support import info_dict, print_info

    if json_output:
        typer.echo(json.dumps(info_dict(), indent=2))
    else:
        print_info()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

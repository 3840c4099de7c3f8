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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

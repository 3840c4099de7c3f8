"""``kvcache onnx ...`` sub-commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Export decoders to ONNX, inject a KV cache into their graphs, check and run them on ONNX Runtime.",
    no_args_is_help=True,
)

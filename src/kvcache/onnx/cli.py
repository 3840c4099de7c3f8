"""``kvcache onnx ...`` sub-commands."""

from __future__ import annotations

import typer

from kvcache import cli_options as opts
from kvcache.cli_errors import guarded

app = typer.Typer(
    help="Export decoders to ONNX, inject a KV cache into their graphs, check and run them on ONNX Runtime.",
    no_args_is_help=True,
)


@app.command("export")
@guarded
def export_cmd(
    model: str = typer.Argument(..., help="A local Hugging Face model directory, or 'default'."),
    out: str = typer.Option(..., "--out", help="Directory to write model.onnx, config.json, tokenizer to."),
    with_cache: bool = typer.Option(False, "--with-cache", help="Export past/present natively."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default 17 legacy, 18 dynamo)."),
    exporter: str = typer.Option("legacy", "--exporter", help="legacy (TorchScript) or dynamo."),
    force: bool = typer.Option(False, "--force",
                               help="Replace OUT when it already holds files (it is replaced as a whole)."),
) -> None:
    """Export MODEL to ONNX (without a cache by default: the input of `kvcache onnx inject`).

    OUT is written as a whole: a new directory is built beside it and moved in place, so no file of an
    earlier export survives next to the new graph. A non-empty OUT is refused unless --force is given.
    """
    from kvcache.onnx.export import export

    path = export(model, out, with_cache=with_cache, opset=opset, exporter=exporter,  # type: ignore[arg-type]
                  force=force)
    typer.echo(str(path))


@app.command("inject")
@guarded
def inject_cmd(
    model: str = typer.Argument(..., help="A graph exported without cache (.onnx) or its directory."),
    out: str | None = typer.Option(None, "--out",
                                   help="Output .onnx file, or a directory (existing, or a new path ending "
                                        "in / or without .onnx; default: <name>_kvcache.onnx beside the "
                                        "input)."),
    attention_stats: bool = typer.Option(
        False, "--attention-stats", help="Also output attn_scores.{i} per layer (summed attention)."),
    policies: bool = typer.Option(
        False, "--policies",
        help="Make the graph run retention policies (`onnx generate --cache h2o:...`): per-layer slot-mask "
             "inputs and attention-logits outputs."),
    fused: bool = typer.Option(
        False, "--fused",
        help="Rewrite attention into ONNX Runtime's fused GroupQueryAttention (and rotary embeddings into "
             "RotaryEmbedding), fold shape arithmetic: the fastest graph on ONNX Runtime, whose cache is "
             "written in place; for caches without a retention policy (not with --policies)."),
    force: bool = typer.Option(False, "--force",
                               help="Overwrite an existing --out file even if it is not an injected graph."),
) -> None:
    """Inject a KV cache (past_key_values.* inputs, present.* outputs) into an exported decoder graph.

    The input graph is never overwritten. An existing output is replaced only when it is an earlier
    injected graph (or with --force).
    """
    from kvcache.onnx.inject import inject_file

    path = inject_file(model, out, attention_stats=attention_stats, policies=policies, fused=fused,
                       force=force)
    typer.echo(str(path))


@app.command()
@guarded
def check(
    original: str = typer.Argument(..., help="The no-cache graph (.onnx, or a directory with model.onnx)."),
    injected: str = typer.Argument(..., help="The injected (or with-past) graph, or its directory."),
    batch: int = typer.Option(2, min=1, max=4096, help="Rows; rows after the first are left-padded."),
    prefill: int = typer.Option(5, min=1, max=65536, help="Tokens of the first, multi-token step."),
    steps: int = typer.Option(4, min=0, max=65536, help="Single-token steps after the prefill."),
    tol: float = typer.Option(1e-4, help="Largest accepted relative logit error."),
    seed: int = typer.Option(0, help="Seed of the random tokens."),
) -> None:
    """Compare INJECTED's step-by-step logits to ORIGINAL's full-sequence logits; exit 1 on mismatch."""
    from kvcache.onnx.check import check_graph

    report = check_graph(original, injected, batch=batch, prefill=prefill, steps=steps, tol=tol, seed=seed)
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


@app.command("generate")
@guarded
def generate_cmd(
    model_dir: str = typer.Argument(..., help="Directory with the graph, config.json and tokenizer."),
    prompt: str = typer.Argument(..., help="The text to continue."),
    cache: opts.CacheOption = "dynamic",
    max_new_tokens: opts.MaxNewTokensOption = 64,
    temperature: opts.TemperatureOption = 0.0,
    top_k: opts.TopKOption = None,
    top_p: opts.TopPOption = None,
    seed: opts.SeedOption = None,
    stop: opts.StopOption = None,
    threads: int | None = typer.Option(None, "--threads", min=1, max=1024,
                                       help="ONNX Runtime intra-op threads (default: one per core)."),
    json_output: opts.JsonOption = False,
) -> None:
    """Generate with ONNX Runtime (cache on the host in kvcache's layers); output as `kvcache generate`."""
    from kvcache.onnx.runtime import OnnxGenerator

    spec = opts.check_generation_options(prompt, cache, temperature, top_k, top_p)
    generator = OnnxGenerator(model_dir, cache=spec, threads=threads)
    result = generator.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop=stop or None)
    opts.print_result(result, json_output)

"""The ``kvcache`` command line: thin wrappers that parse arguments and call typed library functions."""

from __future__ import annotations

import typer

from kvcache import cli_options as opts
from kvcache.chat_cli import chat_command
from kvcache.cli_errors import guarded
from kvcache.onnx.cli import app as onnx_app

app = typer.Typer(
    name="kvcache",
    help="KV-cache layouts, retention policies and ONNX KV-cache injection for LLM text generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(onnx_app, name="onnx")
app.command("chat")(guarded(chat_command))


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", envvar="KVCACHE_DEBUG",
                               help="On an error, print the Python traceback before the one-line message."),
) -> None:
    """KV-cache layouts, retention policies and ONNX KV-cache injection for LLM text generation.

    Exit codes: 0 success, 1 runtime failure, 2 bad input (docs/errors.md).
    """


@app.command()
@guarded
def info(
    json_output: bool = typer.Option(False, "--json", help="Print one machine-readable JSON object."),
    estimate: bool = typer.Option(False, "--estimate",
                                  help="Predict the cache memory of specs for a model and prompt instead."),
    model: str = typer.Option("default", "--model", "-m", help="With --estimate: the model (its config)."),
    specs: list[str] | None = typer.Option(None, "--cache", "-c",
                                           help="With --estimate: a spec to predict (repeatable)."),
    prompt_tokens: int = typer.Option(1024, "--prompt-tokens", min=1, help="With --estimate: prompt length."),
    new_tokens: int = typer.Option(256, "--new-tokens", min=1, help="With --estimate: tokens generated."),
    batch: int = typer.Option(1, "--batch", min=1, help="With --estimate: rows per batch."),
) -> None:
    """Show cache layouts, precisions, placements and policies (parameters, defaults, availability)."""
    import json

    from kvcache.support import info_dict, print_info

    if estimate:
        from transformers.utils import logging as transformers_logging

        from kvcache.estimate import DEFAULT_ESTIMATE_SPECS, estimate_for_model, print_estimates

        transformers_logging.disable_progress_bar()
        data = estimate_for_model(model, specs or list(DEFAULT_ESTIMATE_SPECS), batch=batch,
                                  prompt_len=prompt_tokens, max_new_tokens=new_tokens)
        if json_output:
            typer.echo(json.dumps(data, indent=2))
        else:
            print_estimates(data)
        return
    if json_output:
        typer.echo(json.dumps(info_dict(), indent=2))
    else:
        print_info()


@app.command("generate")
@guarded
def generate_command(
    prompt: str = typer.Argument(..., help="The text to continue."),
    model: str = typer.Option("default", "--model", "-m",
                              help="'default' (bundled), a local model directory or a Hugging Face Hub id."),
    cache: opts.CacheOption = "dynamic",
    max_new_tokens: opts.MaxNewTokensOption = 64,
    temperature: opts.TemperatureOption = 0.0,
    top_k: opts.TopKOption = None,
    top_p: opts.TopPOption = None,
    seed: opts.SeedOption = None,
    stop: opts.StopOption = None,
    device: str | None = typer.Option(None, "--device", help="Torch device: cpu (default), cuda, ..."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: model's)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress",
                                         help="Progress bar on stderr (default: long runs in a terminal)."),
    fallback: opts.FallbackOption = None,
    max_cache_memory: opts.MaxCacheMemoryOption = None,
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="CPU threads (default: 1 for models under 100M parameters, "
                                            "else torch's default)."),
    json_output: opts.JsonOption = False,
) -> None:
    """Generate a continuation of PROMPT: text to stdout, one line of stats to stderr."""
    from transformers.utils import logging as transformers_logging

    from kvcache.generation import generate
    from kvcache.models import load
    from kvcache.threads import choose_threads

    # stderr carries one line of stats; transformers' weight-loading bar would only add noise there.
    transformers_logging.disable_progress_bar()
    # Everything the options can tell is checked before the (slow) model load so a typo fails at once.
    spec = opts.check_generation_options(prompt, cache, temperature, top_k, top_p)
    fallback_specs, limit = opts.check_fallback_options(fallback, max_cache_memory)
    lm, tokenizer = load(model, device=device, dtype=dtype)
    choose_threads(lm, threads)
    result = generate(lm, tokenizer, prompt, cache=spec, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop or None,
                      progress=progress, fallback=fallback_specs, max_cache_memory=limit)
    opts.print_result(result, json_output)


@app.command("bench")
@guarded
def bench_command(
    out: str = typer.Option(..., "--out", "-o",
                            help="Results folder (created; a finished row is never redone)."),
    model: str = typer.Option("default", "--model", "-m",
                              help="'default' (bundled) or a local model directory."),
    specs: str = typer.Option("full,static,dynamic", "--specs",
                              help="Comma-separated cache specs; 'full' (the baseline) is always run."),
    tasks: str = typer.Option("passkey,needles,ppl,consistency", "--tasks",
                              help="Of: passkey, needles, kv, ppl, consistency, conversation "
                                   "(+ speed: see --speed)."),
    speed: bool = typer.Option(True, "--speed/--no-speed",
                               help="Decode time and cache bytes against context (the speed plots)."),
    peers: str = typer.Option("hf,kvpress", "--peers",
                              help="Of: hf (transformers' caches), kvpress (side environment); '': none."),
    budgets: str = typer.Option("0.5,0.25,0.1", "--budgets", help="Kept fractions for the kvpress presses."),
    presses: str = typer.Option("", "--presses", help="kvpress presses (default: all compared)."),
    quick: bool = typer.Option(False, "--quick", help="Small prompt sets, one budget: a few minutes."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1: stable timings)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Repeats of each speed measurement."),
    kvpress_python: str | None = typer.Option(None, "--kvpress-python",
                                              help="Python of the kvpress side environment."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Quality, memory and speed of cache specs side by side with peers: JSON, CSV, Markdown, plots, HTML."""
    import shlex
    import sys
    from pathlib import Path

    from kvcache.bench.runner import BenchConfig, parse_list, run_bench

    budget_list = [float(b) for b in parse_list(budgets)]
    if quick and budgets == "0.5,0.25,0.1":
        budget_list = [0.5]
    task_list = parse_list(tasks)
    if speed and "speed" not in task_list:
        task_list.append("speed")
    cfg = BenchConfig(out=Path(out), model=model, specs=parse_list(specs), tasks=task_list,
                      peers=parse_list(peers), budgets=budget_list, quick=quick, threads=threads,
                      speed_repeats=1 if quick and repeats == 3 else repeats,
                      kvpress_python=Path(kvpress_python) if kvpress_python else None,
                      command="kvcache " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if presses:
        cfg.presses = parse_list(presses)
    cfg.check()
    results = run_bench(cfg, progress=progress)
    typer.echo((Path(out) / "results.md").read_text())
    typer.echo(f"wrote {out}/: results.json, results.csv, results.md, plots/, report.html "
               f"({len(results['rows'])} rows)", err=True)


@app.command("export-lmeval")
@guarded
def export_lmeval_command(
    out: str = typer.Argument(..., help="Folder for the task files (created if missing)."),
    model: str = typer.Option("default", "--model", "-m",
                              help="Whose tokenizer sizes the prompts: 'default' or a model folder."),
    tasks: str = typer.Option("passkey,needles", "--tasks", help="Of: passkey, needles."),
    quick: bool = typer.Option(False, "--quick", help="The prompt sizes of `kvcache bench --quick`."),
    contexts: str = typer.Option("", "--contexts", help="Prompt lengths in tokens, e.g. 512,1024 "
                                 "(default: those of `kvcache bench`)."),
    n: int | None = typer.Option(None, "--n", min=1, help="Examples per context (default: the bench's)."),
    force: bool = typer.Option(False, "--force", help="Overwrite task files already in OUT."),
) -> None:
    """Write the bench's passkey and multi-needle prompts as offline lm-eval tasks (JSONL + YAML) into OUT.

    Then: lm_eval --model kvcache --model_args pretrained=default,cache=keyformer:budget=0.5 --tasks OUT
    """
    from kvcache.bench.lmeval_tasks import export_lmeval_tasks
    from kvcache.bench.prompts import PromptSettings
    from kvcache.bench.runner import parse_list
    from kvcache.errors import KVCacheError
    from kvcache.models.load import DEFAULT_MODEL_DIR, load_tokenizer

    try:
        context_list = [int(c) for c in parse_list(contexts)] or None
    except ValueError:
        raise KVCacheError(f"--contexts takes token counts separated by commas, got {contexts!r}") from None
    source = DEFAULT_MODEL_DIR if model == "default" else model
    tokenizer = load_tokenizer(source)
    settings = PromptSettings.quick() if quick else PromptSettings()
    written = export_lmeval_tasks(out, tokenizer, tasks=parse_list(tasks), settings=settings,
                                  contexts=context_list, n=n, overwrite=force)
    for path in written:
        typer.echo(str(path))
    typer.echo(f"run: lm_eval --model kvcache --model_args pretrained={model},cache=full --tasks {out}",
               err=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

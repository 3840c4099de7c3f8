"""What ``kvcache generate`` and ``kvcache onnx generate`` share: their options, error exit and output.

The options are ``typing.Annotated`` aliases; a command takes one as ``cache: CacheOption = "dynamic"``, so
both commands keep the same flags, help texts and defaults. Only ``typer`` is imported here: the CLI's
fast paths (``--help``, ``info``) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from kvcache.result import GenerationResult
    from kvcache.spec import CacheSpec

CacheOption = Annotated[str, typer.Option(
    "--cache", "-c", help="Cache spec: dynamic, static, static:capacity=N, ... (`kvcache info`).")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most new tokens.")]
TemperatureOption = Annotated[float, typer.Option("--temperature", "-t", min=0.0,
                                                  help="0 = greedy decoding.")]
TopKOption = Annotated[int | None, typer.Option("--top-k", min=1,
                                                help="Sample among the k most likely tokens.")]
TopPOption = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
SeedOption = Annotated[int | None, typer.Option("--seed", min=-(2**63), max=2**64 - 1,
                                                help="Seed for reproducible sampling.")]
StopOption = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeat for several).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON: text, stats, finish_reason, cache.")]
FallbackOption = Annotated[list[str] | None, typer.Option(
    "--fallback", help="Cache spec to run when the previous one runs out of memory; repeat for a chain, "
    "tried in order after --cache (one spec per flag: specs contain commas).")]
MaxCacheMemoryOption = Annotated[str | None, typer.Option(
    "--max-cache-memory", help="Largest KV cache on the device, e.g. 512MiB, 2GiB, 1.5GB: the first spec of "
    "--cache then --fallback predicted to fit is run, before anything is allocated.")]


def check_generation_options(prompt: str, cache: str, temperature: float, top_k: int | None,
                             top_p: float | None) -> CacheSpec:
    """Check what the options of a generate command can tell before any model loads; return the spec.

    Raises
    ------
    KVCacheError
        For a bad spec, a prompt that is not UTF-8, or sampling settings out of range.
    """
    from kvcache.sampling import Sampler
    from kvcache.spec import CacheSpec
    from kvcache.validate import check_prompts

    spec = CacheSpec.parse(cache)
    spec.require_available()
    check_prompts(prompt)
    Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    return spec


def check_fallback_options(fallback: list[str] | None,
                           max_cache_memory: str | None) -> tuple[list[CacheSpec], int | None]:
    """The fallback specs and the cache memory limit in bytes, checked before any model loads.

    Raises
    ------
    KVCacheError
        For a bad or unavailable spec, or a size that cannot be read.
    """
    from kvcache.estimate import parse_size
    from kvcache.spec import CacheSpec

    specs = [CacheSpec.parse(s) for s in fallback or ()]
    for spec in specs:
        spec.require_available()
    return specs, None if max_cache_memory is None else parse_size(max_cache_memory)


def print_result(result: GenerationResult, json_output: bool) -> None:
    """Print the first row of ``result``: its text to stdout and one line of stats to stderr, or JSON."""
    import json

    if json_output:
        typer.echo(json.dumps({"text": result.texts[0], "stats": result.stats.to_dict(),
                               "finish_reason": result.finish_reasons[0], "cache": result.cache,
                               "attempts": result.attempts}))
    else:
        typer.echo(result.texts[0])
        typer.echo(f"[{result.cache}] finish={result.finish_reasons[0]} | {result.stats.summary()}", err=True)
        if result.attempts:
            tried = "; ".join(f"{a['spec']}: {a['reason']}" for a in result.attempts)
            typer.echo(f"[{result.cache}] ran after: {tried}", err=True)

"""End-to-end greedy generation on ONNX Runtime: ``kvcache onnx generate`` against onnxruntime-genai.

Both run the same model (the bundled one, or a random Llama of realistic shape) on one thread, after the
same prompt, in the same process, taking turns:

* ``kvcache``: :meth:`OnnxGenerator.generate` on the graph injected with ``--fused`` (ONNX Runtime's fused
  attention and rotary ops, the cache written in place into kvcache's dynamic store), greedy;
* ``genai``: onnxruntime-genai's own graph of the model (its model builder, offline) and its C++ loop,
  ``Generator.generate_next_token``, greedy;
* ``bare``: the same fused graph in a bare greedy ONNX Runtime loop (``onnx_decode.raw_fused_loop``: buffers
  bound once, three inputs bound per step, each run's argmax the next token, no kvcache code): the least any
  generation loop does, so the gap to it is what kvcache's host side costs.

The time per new token is the decode phase only (from the end of the prefill to the last token, divided by
the forwards it ran), the median over ``--repeats`` runs. The table also says whether all three produced the
same tokens (up to the first end-of-sequence token: onnxruntime-genai is kept from choosing it, so that all
run the same number of steps).

Run: ``python benchmarks/onnx_generate.py --bundled`` (``--json PATH`` to save).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from kvcache.files import write_text_atomic
from kvcache.hooks import DecodeHooks
from kvcache.models import load
from kvcache.models.random import random_model
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import KVCacheInjector
from kvcache.onnx.runtime import OnnxGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_decode import build_genai, raw_fused_loop  # noqa: E402


def bare(graph: Path, ids: list[int], new_tokens: int, opts: ort.SessionOptions) -> tuple[float, list[int]]:
    """Seconds per step of the bare greedy loop on the fused graph after a prefill of ``ids``, and its
    tokens."""
    import numpy as np

    tokens = np.asarray([ids + [0] * new_tokens], dtype=np.int64)
    step = raw_fused_loop(graph, tokens, len(ids), opts, len(ids) + new_tokens + 1, greedy=True)
    step(0)
    start = time.perf_counter()
    for i in range(1, new_tokens - 1):
        step(i)
    seconds = (time.perf_counter() - start) / (new_tokens - 2)
    return seconds, [int(t) for t in tokens[0, len(ids):]]


def ours(gen: OnnxGenerator, text: str, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds per decode forward of ``kvcache onnx generate``'s loop, and the tokens."""
    marks: list[float] = []
    hooks = DecodeHooks(after_prefill=lambda cache: marks.append(time.perf_counter()))
    result = gen.generate(text, max_new_tokens=new_tokens, eos_token_id=[], hooks=hooks)
    end = time.perf_counter()
    return (end - marks[0]) / (new_tokens - 1), result.token_ids[0]


def genai(model: object, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Seconds per ``generate_next_token`` after the first, and the tokens."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # min_length: no stop at the end-of-sequence token (kvcache's side runs with eos_token_id=[])
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens,
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    generator.generate_next_token()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        generator.generate_next_token()
    seconds = (time.perf_counter() - start) / (new_tokens - 1)
    if len(generator.get_sequence(0)) != len(ids) + new_tokens:
        raise RuntimeError("onnxruntime-genai stopped early; its timing would not be per token")
    return seconds, [int(t) for t in generator.get_sequence(0)[len(ids):]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundled", action="store_true", help="the bundled model instead of a random Llama")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import onnxruntime_genai as og
    except ImportError:
        print("onnxruntime-genai is not installed (pip install 'kvcache[peers]'): nothing to compare",
              file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    bundled, tokenizer = load("default")
    model = bundled if args.bundled else random_model(
        "llama", seed=0, num_layers=8, hidden=512, num_heads=8, num_kv_heads=4, vocab_size=32000,
        max_positions=max(args.contexts) + args.new_tokens + 8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    vocab = min(model.config.vocab_size, len(tokenizer))
    gen_ids = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = export_model(model, root / "plain")
        fused_dir = root / "fused"
        fused_dir.mkdir()
        original = onnx.load(str(plain), load_external_data=False)
        proto = KVCacheInjector(plain.parent, fused=True).apply(original)
        onnx.save(proto, str(fused_dir / "model.onnx"))
        model.config.save_pretrained(fused_dir)
        genai_dir = build_genai(model, tokenizer, root, args.threads)
        if genai_dir is None:
            return 1
        peer = og.Model(str(genai_dir))
        generator = OnnxGenerator(fused_dir, tokenizer=tokenizer, session_options=opts)
        for context in args.contexts:
            text = tokenizer.decode(torch.randint(3, vocab, (context,), generator=gen_ids).tolist())
            # decoded ids re-encode into about as many tokens: cut the text to `context` of them
            text = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:context])
            ids = [int(t) for t in generator.tokenizer(text)["input_ids"]]
            times: dict[str, list[float]] = {"kvcache": [], "genai": [], "bare": []}
            tokens: dict[str, list[int]] = {}
            for r in range(args.repeats + 1):  # the first round warms up
                for name in (("kvcache", "genai") if r % 2 else ("genai", "kvcache")):
                    seconds, out = (ours(generator, text, args.new_tokens) if name == "kvcache"
                                    else genai(peer, ids, args.new_tokens))
                    if r:
                        times[name].append(seconds)
                    tokens[name] = out
                if r:
                    seconds, tokens["bare"] = bare(fused_dir / "model.onnx", ids, args.new_tokens, opts)
                    times["bare"].append(seconds)
            # onnxruntime-genai never picks the end-of-sequence token below min_length: compare up to it
            eos = tokenizer.eos_token_id
            cut = tokens["kvcache"].index(eos) if eos in tokens["kvcache"] else args.new_tokens
            row = {"context": len(ids), **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
                   "same_tokens": tokens["kvcache"][:cut] == tokens["genai"][:cut] == tokens["bare"][:cut],
                   "compared_tokens": cut,
                   "samples_s": times}
            rows.append(row)
            print(f"prompt {len(ids)} tokens: kvcache {row['kvcache_ms']:.2f} ms/token, genai "
                  f"{row['genai_ms']:.2f}", file=sys.stderr)
    setup = (f"{'bundled model' if args.bundled else 'random llama 8x512, vocab 32000'}, fp32, batch 1, "
             f"{args.threads} thread(s), {args.new_tokens} new tokens, median of {args.repeats}, ORT "
             f"{ort.__version__}, onnxruntime-genai {og.__version__}")
    print(f"\n{setup}\n")
    print("| prompt tokens | kvcache onnx generate (fused) ms/token | onnxruntime-genai ms/token | "
          "bare ORT loop, fused graph | kvcache / genai | kvcache / bare | same greedy tokens |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['context']} | {r['kvcache_ms']:.2f} | {r['genai_ms']:.2f} | {r['bare_ms']:.2f} | "
              f"{r['kvcache_ms'] / r['genai_ms']:.2f}x | {r['kvcache_ms'] / r['bare_ms']:.2f}x | "
              f"{'yes' if r['same_tokens'] else 'no'} (first {r['compared_tokens']}) |")
    if args.json is not None:
        write_text_atomic(args.json, json.dumps({"setup": setup, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

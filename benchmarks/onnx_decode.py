"""Per-token decode time on ONNX Runtime: injected KV cache vs. no cache, native with-past export, PyTorch.

One run exports a random Llama of realistic shape (no weights are downloaded) three ways — without a cache,
with a natively exported cache, and without a cache and then injected by :class:`KVCacheInjector` — and
times single-token decode steps after a prompt of each context length:

* ``fused``: the graph injected with ``--fused`` (every attention layer ONNX Runtime's fused
  GroupQueryAttention, shape arithmetic folded), cache on the host in kvcache's dynamic layers, which the
  graph writes the new tokens into in place (:class:`OnnxGenerator`, an IO binding);
* ``fused_raw``: the same fused graph in a bare loop: one preallocated numpy buffer per cache tensor bound
  once as past and present, three small inputs bound per step (no kvcache code): the cost of the host side
  is the gap between ``fused`` and ``fused_raw``;
* ``injected``: the graph injected without ``--fused``, same host loop;
* ``native``: the natively exported with-past graph, same host loop (so the ratio isolates the graph);
* ``raw``: the native graph in a bare ``session.run`` loop feeding ``present`` back as ``past`` (numpy, no
  kvcache layers): the cost of the host-side layers is the gap between ``native`` and ``raw``;
* ``no-cache``: the original graph recomputing the whole sequence for every token;
* ``torch``: PyTorch eager with a kvcache ``dynamic`` cache;
* ``genai``: onnxruntime-genai (a peer, the optional ``peers`` extra): its model builder turns the same
  model, saved as a local Hugging Face directory, into its own fp32 CPU graph (fused GroupQueryAttention,
  past and present sharing one preallocated buffer), decoded with ``Generator.generate_next_token``.
  Left out, with a note, when the package is not installed.

Run: ``python benchmarks/onnx_decode.py`` (``--quick`` for a smaller smoke run, ``--bundled`` for the bundled
model instead of the random Llama, ``--json PATH`` to save).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kvcache.cache import KVCache
from kvcache.files import write_text_atomic
from kvcache.models.random import random_model
from kvcache.onnx import names
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import KVCacheInjector
from kvcache.onnx.runtime import OnnxGenerator

Step = Callable[[int], None]


def host_loop(graph_dir: Path, ids: torch.Tensor, context: int, opts: ort.SessionOptions) -> Step:
    """Prefill ``context`` tokens through :class:`OnnxGenerator` (host-side dynamic cache); return the
    decode step: ``step(i)`` feeds token ``context + i``."""
    gen = OnnxGenerator(graph_dir, session_options=opts)
    cache = KVCache.from_spec("dynamic", gen.config, batch_size=1, device="cpu")
    ones = torch.ones(1, ids.shape[1], dtype=torch.int64)
    positions = torch.arange(ids.shape[1])[None]
    for lo in range(0, context, 512):  # chunked prefill, as generate() does
        hi = min(lo + 512, context)
        gen.step(cache, ids[:, lo:hi], ones[:, :lo], ones[:, lo:hi], positions[:, lo:hi])

    def step(i: int) -> None:
        t = context + i
        gen.step(cache, ids[:, t : t + 1], ones[:, :t], ones[:, t : t + 1], positions[:, t : t + 1])

    return step


def raw_loop(graph: Path, ids: np.ndarray, context: int, opts: ort.SessionOptions) -> Step:
    """A bare ``session.run`` loop feeding ``present`` back as ``past`` (no kvcache layers)."""
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    cache_inputs = [i for i in sess.get_inputs() if names.is_cache_input(i.name)]
    kv_heads, head_dim = cache_inputs[0].shape[1], cache_inputs[0].shape[3]
    past = {i.name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for i in cache_inputs}
    out_names = [names.LOGITS] + [n.replace(names.PAST_PREFIX, names.PRESENT_PREFIX) for n in past]
    takes_positions = any(i.name == names.POSITION_IDS for i in sess.get_inputs())

    def run(lo: int, hi: int) -> None:
        feeds = {names.INPUT_IDS: ids[:, lo:hi], names.ATTENTION_MASK: np.ones((1, hi), np.int64), **past}
        if takes_positions:
            feeds[names.POSITION_IDS] = np.arange(lo, hi, dtype=np.int64)[None]
        _, *presents = sess.run(out_names, feeds)
        past.update(zip(past, presents, strict=True))

    for lo in range(0, context, 512):
        run(lo, min(lo + 512, context))
    return lambda i: run(context + i, context + i + 1)


def raw_fused_loop(graph: Path, ids: np.ndarray, context: int, opts: ort.SessionOptions,
                   capacity: int, head_dim_default: int = 0, greedy: bool = False) -> Step:
    """A bare loop on the fused graph: past and present share one preallocated buffer per cache tensor,
    bound once; each step binds input_ids, attention_mask and position_ids and runs (no kvcache layers).

    ``greedy``: a bare greedy generation instead of a replay of ``ids``: each run's argmax is written into
    ``ids`` as the next step's token (so ``ids[0, context:]`` ends up holding the generated tokens)."""
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_output(names.LOGITS, "cpu")
    kept = []
    for i in sess.get_inputs():
        if names.is_cache_input(i.name):
            head_dim = i.shape[3] if isinstance(i.shape[3], int) else head_dim_default
            buf = np.zeros((1, i.shape[1], capacity, head_dim), np.float32)
            kept.append(buf)
            for name in (i.name, i.name.replace(names.PAST_PREFIX, names.PRESENT_PREFIX)):
                (binding.bind_input if name == i.name else binding.bind_output)(
                    name, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    ones = np.ones((1, ids.shape[1]), np.int64)
    takes_positions = any(i.name == names.POSITION_IDS for i in sess.get_inputs())

    def run(lo: int, hi: int, buffers: list[np.ndarray] = kept) -> None:  # the binding reads `kept`: keep it
        binding.bind_cpu_input(names.INPUT_IDS, ids[:, lo:hi])
        binding.bind_cpu_input(names.ATTENTION_MASK, ones[:, :hi])
        if takes_positions:
            binding.bind_cpu_input(names.POSITION_IDS, positions[:, lo:hi])
        binding.bind_output(names.LOGITS, "cpu")
        sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        if greedy and context <= hi < ids.shape[1]:  # the prompt's own tokens stay
            ids[:, hi] = logits[:, -1].argmax(-1)

    for lo in range(0, context, 512):
        run(lo, min(lo + 512, context))
    return lambda i: run(context + i, context + i + 1)


def no_cache(graph: Path, ids: np.ndarray, context: int, opts: ort.SessionOptions) -> Step:
    """The original graph recomputing the whole sequence for every new token."""
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    takes_positions = any(i.name == names.POSITION_IDS for i in sess.get_inputs())

    def step(i: int) -> None:
        t = context + i + 1
        feeds = {names.INPUT_IDS: ids[:, :t], names.ATTENTION_MASK: np.ones((1, t), np.int64)}
        if takes_positions:
            feeds[names.POSITION_IDS] = np.arange(t, dtype=np.int64)[None]
        sess.run([names.LOGITS], feeds)

    return step


def torch_loop(model: torch.nn.Module, ids: torch.Tensor, context: int) -> Step:
    """PyTorch eager with a kvcache dynamic cache."""
    cache = KVCache.from_spec("dynamic", model.config, batch_size=1, device="cpu")
    ones = torch.ones(1, ids.shape[1], dtype=torch.int64)

    def run(lo: int, hi: int) -> None:
        with torch.inference_mode():
            model(input_ids=ids[:, lo:hi], attention_mask=ones[:, :hi], cache=cache, use_cache=True,
                  logits_to_keep=1)

    for lo in range(0, context, 512):
        run(lo, min(lo + 512, context))
    return lambda i: run(context + i, context + i + 1)


def build_genai(model: torch.nn.Module, tokenizer: object | None, root: Path, threads: int) -> Path | None:
    """onnxruntime-genai's own graph of ``model`` (its model builder on a local HF directory, offline, fp32,
    CPU), with ``threads`` intra-op threads in its config; ``None`` when onnxruntime-genai is missing."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("onnxruntime-genai is not installed (pip install 'kvcache[peers]'): no genai row",
              file=sys.stderr)
        return None
    hf, out = root / "hf", root / "genai"
    model.save_pretrained(hf)
    if tokenizer is None:
        # the builder writes a tokenizer's processing files beside its graph; decoding here feeds token ids,
        # so the bundled model's tokenizer serves a random model too
        from kvcache.models import load

        tokenizer = load("default")[1]
    tokenizer.save_pretrained(hf)  # type: ignore[attr-defined]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                            str(out), "-p", "fp32", "-e", "cpu", "-c", str(root / "genai_cache")], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if built.returncode:
        print(f"onnxruntime-genai's model builder failed, no genai row: {built.stderr[-500:]}",
              file=sys.stderr)
        return None
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=1))
    return out


def genai_loop(graph_dir: Path, ids: np.ndarray, context: int, max_length: int) -> Step:
    """onnxruntime-genai's decode loop: prefill ``context`` tokens, then one ``generate_next_token`` per
    step (greedy; the token fed is its own, which costs the same as feeding ours)."""
    import onnxruntime_genai as og

    model = og.Model(str(graph_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[0, :context].astype(np.int32))
    return lambda i: generator.generate_next_token()


def interleaved(steppers: dict[str, Step], steps: int, warmup: int,
                sparse: dict[str, int]) -> dict[str, list[float]]:
    """Seconds per step of each stepper, run in turns (one step each per round, the order rotating every
    round) so that load from other processes hits all of them alike. A stepper in ``sparse`` only runs
    every ``sparse[name]``-th round. Warm-up rounds are not recorded."""
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    calls = dict.fromkeys(steppers, 0)
    order = list(steppers)
    for rnd in range(warmup + steps):
        for name in order[rnd % len(order):] + order[: rnd % len(order)]:
            if rnd % sparse.get(name, 1):
                continue
            t0 = time.perf_counter()
            steppers[name](calls[name])
            elapsed = time.perf_counter() - t0
            calls[name] += 1
            if rnd >= warmup:
                samples[name].append(elapsed)
    return samples


def build_graphs(model: torch.nn.Module, root: Path) -> dict[str, Path]:
    """Export no-cache and native with-past graphs, and inject a cache into copies of the no-cache one
    (plain and ``--fused``)."""
    plain = export_model(model, root / "plain")
    native = export_model(model, root / "native", with_cache=True)
    model.config.save_pretrained(native.parent)
    graphs = {"plain": plain, "native": native}
    for name, fused in (("injected", False), ("fused", True)):
        directory = root / name
        directory.mkdir()
        original = onnx.load(str(plain), load_external_data=False)
        proto = KVCacheInjector(plain.parent, fused=fused).apply(original)
        onnx.save(proto, str(directory / "model.onnx"))
        model.config.save_pretrained(directory)
        graphs[name] = directory / "model.onnx"
    return graphs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, short contexts (smoke run)")
    parser.add_argument("--bundled", action="store_true", help="the bundled model instead of a random Llama")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 128 512 1024")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 20, quick 4)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1,
                        help="ORT intra-op and torch threads (default 1: stable numbers on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.kv_heads, args.vocab = 2, 128, 4, 2, 1024
    contexts = args.contexts or ([64, 256] if args.quick else [128, 512, 1024])
    steps = args.steps or (4 if args.quick else 20)
    warmup = 2
    threads = args.threads
    torch.set_num_threads(threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Several sessions take turns here: ORT's worker threads must not spin between runs, or each idle
    # session steals the cores the running one (or PyTorch) needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    tokenizer = None
    if args.bundled:
        from kvcache.models import load

        model, tokenizer = load("default")
        text = model.config
        args.layers, args.hidden = text.num_hidden_layers, text.hidden_size
        args.heads, args.kv_heads = text.num_attention_heads, text.num_key_value_heads
        args.vocab = text.vocab_size
    else:
        model = random_model("llama", seed=0, num_layers=args.layers, hidden=args.hidden,
                             num_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab,
                             max_positions=max(contexts) + steps + warmup + 8)
    gen = torch.Generator().manual_seed(0)
    length = max(contexts) + steps + warmup + 1
    ids = torch.randint(3, args.vocab, (1, length), generator=gen)
    shape = (f"{'bundled model: ' if args.bundled else ''}llama {args.layers} layers, hidden {args.hidden}, "
             f"{args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}, fp32, batch 1, {threads} "
             f"threads, ORT {ort.__version__}, torch {torch.__version__}")
    print(shape, file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graphs = build_graphs(model, Path(tmp))
        genai_dir = build_genai(model, tokenizer, Path(tmp), threads)
        for context in contexts:
            steppers = {
                "fused": host_loop(graphs["fused"].parent, ids, context, opts),
                "fused_raw": raw_fused_loop(graphs["fused"], ids.numpy(), context, opts, length + 1),
                "injected": host_loop(graphs["injected"].parent, ids, context, opts),
                "native": host_loop(graphs["native"].parent, ids, context, opts),
                "raw": raw_loop(graphs["native"], ids.numpy(), context, opts),
                "no_cache": no_cache(graphs["plain"], ids.numpy(), context, opts),
                "torch": torch_loop(model, ids, context),
            }
            if genai_dir is not None:
                steppers["genai"] = genai_loop(genai_dir, ids.numpy(), context, length + 1)
            # full recomputes are slow: one every 5 rounds still gives a stable median
            samples = interleaved(steppers, steps, warmup, sparse={"no_cache": 5})
            row = {"context": context, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in samples.items()}}
            rows.append({**row, "samples_s": samples})
            timings = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "context")
            print(f"context {context}: {timings}", file=sys.stderr)

    has_genai = "genai_ms" in rows[0]
    columns = [("fused", "fused ms/token"), ("fused_raw", "bare fused loop"),
               ("injected", "injected (unfused)"), ("native", "native with-past"), ("raw", "raw ORT loop"),
               ("no_cache", "no-cache recompute"),
               ("torch", "PyTorch eager")] + ([("genai", "onnxruntime-genai")] if has_genai else [])
    ratios = [("fused", "fused_raw", "fused / bare fused"), ("fused", "raw", "fused / raw"),
              ("no_cache", "fused", "no-cache / fused"), ("injected", "native", "injected / native")] + \
        ([("fused", "genai", "fused / genai")] if has_genai else [])
    header = ("| context | " + " | ".join(c[1] for c in columns) + " | " + " | ".join(r[2] for r in ratios)
              + " |")
    print(header)
    print("|" + "---|" + "---:|" * (header.count("|") - 2))
    for r in rows:
        cells = [f"{r[k + '_ms']:.2f}" for k, _ in columns]
        cells += [f"{r[a + '_ms'] / r[b + '_ms']:.2f}x" for a, b, _ in ratios]
        print(f"| {r['context']} | " + " | ".join(cells) + " |")
    longest = rows[-1]
    speedup = longest["no_cache_ms"] / longest["fused_ms"]
    worst = max(r["injected_ms"] / r["native_ms"] for r in rows)
    host = max(r["fused_ms"] / r["fused_raw_ms"] for r in rows)
    print(f"\nno-cache / fused at {longest['context']}: {speedup:.1f}x (goal >= 10x at 1024: "
          f"{'met' if speedup >= 10 else 'NOT met'}); injected / native, worst context: {worst:.2f}x "
          f"(goal <= 1.1x: {'met' if worst <= 1.1 else 'NOT met'}); fused / bare fused loop, worst context: "
          f"{host:.2f}x (goal <= 1.05x: {'met' if host <= 1.05 else 'NOT met'})")
    if has_genai:
        vs = max(r["fused_ms"] / r["genai_ms"] for r in rows)
        print(f"fused / onnxruntime-genai, worst context: {vs:.2f}x (goal <= 1x: "
              f"{'met' if vs <= 1 else 'NOT met'})")
    if args.json is not None:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "load_average": os.getloadavg(), "python": platform.python_version(),
                   "onnxruntime": ort.__version__, "torch": torch.__version__}
        write_text_atomic(args.json, json.dumps({"setup": shape, "steps": steps, "machine": machine,
                                                 "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

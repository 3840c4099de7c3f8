"""Export a tiny random decoder the plain way: ``torch.onnx.export(wrapper, (input_ids, attention_mask))``.

The wrapper returns only the logits and passes no ``position_ids``, so the graph computes the token
positions itself, as most no-cache ONNX decoders found in the wild do. These graphs are the input of the
injector's position rewrite (``kvcache.onnx.rewrite_positions``) in the test matrix.

Self-contained on purpose: it imports torch, transformers, onnx and onnxruntime, and only
``src/kvcache/models/random.py`` from kvcache (by path), so it also runs in the side environment with an
older transformers release made by ``scripts/peer-env.sh transformers4`` (kvcache itself needs
transformers 5)::

    python scripts/export_plain.py llama eager --exporter legacy --out DIR   # prints a JSON summary

``DIR`` receives ``model.onnx`` and ``config.json``; the graph is checked against the PyTorch model on a
left-padded batch of two before the command succeeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from standalone import load_module  # noqa: E402

random_models = load_module("kvcache_random_models", "models/random.py")

#: the fixture models: ``tests/onnx_fixtures.FIXTURE_MODEL`` (kept equal by a test)
MODEL = {"num_layers": 2, "hidden": 32, "num_heads": 4, "max_positions": 64}


class PlainLogits(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> logits``: no cache, no positions."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def build_model(arch: str, attn: str) -> torch.nn.Module:
    """The tiny random model of ``arch`` (seed 0); ``random_model`` itself where this transformers has the
    ``dtype`` keyword, else the same config built with the older ``torch_dtype`` keyword."""
    config = random_models.random_config(arch, **MODEL)
    if int(transformers.__version__.split(".")[0]) >= 5:
        return random_models.random_model(arch, attn_implementation=attn, **MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                              torch_dtype=torch.float32)
    return model.eval()


def export_plain(model: torch.nn.Module, path: Path, exporter: str, opset: int) -> None:
    """Write ``path`` (one ``model.onnx``, weights embedded) from ``(input_ids, attention_mask)`` only."""
    wrapper = PlainLogits(model).eval()
    ids = torch.randint(3, int(model.config.vocab_size), (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 0] = 0  # a padded row, so the exporter cannot specialise on an all-ones mask
    io = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {"batch_size": 0, "sequence_length": 1}
            dynamic = {n: {v: k for k, v in axes.items()} for n in ("input_ids", "attention_mask", "logits")}
            torch.onnx.export(wrapper, (ids, mask), str(path), dynamo=False, opset_version=opset,
                              dynamic_axes=dynamic, do_constant_folding=True, **io)
        else:
            batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
            program = torch.onnx.export(wrapper, (ids, mask), dynamo=True, opset_version=opset, optimize=True,
                                        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                        verbose=False, **io)
            program.save(str(path))


def check_against_torch(model: torch.nn.Module, path: Path) -> float:
    """Relative error of the graph's logits against PyTorch's on a left-padded batch of two (9 tokens)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, int(model.config.vocab_size), (2, 9)).astype(np.int64)
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    sess = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = PlainLogits(model)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    real = mask.astype(bool)
    return float(np.abs(got - want)[real].max() / np.abs(want[real]).max())


def versions() -> dict[str, str]:
    """Versions of the packages that made a graph."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arch")
    parser.add_argument("attn", choices=["eager", "sdpa"])
    parser.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    parser.add_argument("--opset", type=int, default=None, help="default 17 (legacy) / 18 (dynamo)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    opset = args.opset or (17 if args.exporter == "legacy" else 18)
    torch.set_num_threads(1)
    model = build_model(args.arch, args.attn)
    args.out.mkdir(parents=True, exist_ok=True)
    export_plain(model, args.out / "model.onnx", args.exporter, opset)
    model.config.save_pretrained(str(args.out))
    err = check_against_torch(model, args.out / "model.onnx")
    summary: dict[str, Any] = {"arch": args.arch, "attn": args.attn, "exporter": args.exporter,
                               "opset": opset, "relative_error_vs_torch": err, **versions()}
    print(json.dumps(summary))
    if not np.isfinite(err) or err > 1e-4:
        print(f"{args.arch}/{args.attn}: exported graph differs from PyTorch (relative error {err:.2e})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A folder of good and broken inputs for the bad-input tests, and a fingerprint of every file in it.

``build(root)`` writes (in a few seconds: tiny random models, two legacy exports):

=================  ==============================================================================
``llama/``         a tiny Llama (context 64) + tokenizer          ``gpt2/`` the same for GPT-2 (3 layers)
``bert/``          a tiny BERT masked LM (an encoder) + tokenizer ``t5/`` a T5 config (encoder-decoder)
``noconfig/``      a folder with one text file                    ``badconfig/`` config.json is not JSON
``unknowntype/``   config.json with an unknown model_type         ``notes.txt`` an unrelated file
``corrupt_st/``    the Llama with random bytes as model.safetensors; ``truncated_st/`` with half of it
``exp/``           the Llama exported (model.onnx) and injected (model_kvcache.onnx)
``gpt2exp/``       the GPT-2 exported
``stale/``         GPT-2's export beside the Llama's injected graph (a re-export that left it behind)
``mismatch/``      the Llama's graphs beside GPT-2's config.json
``noise/``         random bytes as model.onnx, the Llama's config
``bertonnx/``      the Llama's model.onnx beside BERT's config
``noconf/``        the injected graph alone, no config.json
=================  ==============================================================================
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

from transformers import BertConfig, BertForMaskedLM, T5Config

from kvcache.models.random import random_model
from kvcache.models.tiny_tokenizer import tiny_tokenizer
from kvcache.onnx.export import export_model
from kvcache.onnx.inject import inject_file

TINY = {"hidden": 32, "num_heads": 4, "max_positions": 64}


def _save(model, path: Path) -> None:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(str(path))


def build(root: Path) -> Path:
    """Write the workspace under ``root``; return ``root``."""
    llama = random_model("llama", seed=1, num_layers=2, **TINY)
    gpt2 = random_model("gpt2", seed=2, num_layers=3, **TINY)
    _save(llama, root / "llama")
    _save(gpt2, root / "gpt2")
    bert_config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64)
    _save(BertForMaskedLM(bert_config), root / "bert")
    T5Config(vocab_size=300, d_model=32, num_layers=1, num_heads=2).save_pretrained(root / "t5")
    (root / "noconfig").mkdir()
    (root / "noconfig" / "readme.txt").write_text("not a model\n")
    (root / "badconfig").mkdir()
    (root / "badconfig" / "config.json").write_text("{not json")
    (root / "unknowntype").mkdir()
    (root / "unknowntype" / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    (root / "notes.txt").write_text("an unrelated file the user cares about\n")
    for name, cut in (("corrupt_st", None), ("truncated_st", 0.5)):
        shutil.copytree(root / "llama", root / name)
        weights = root / name / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: int(len(data) * cut)] if cut else bytes(range(256)) * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(llama, root / "exp", tokenizer=tiny_tokenizer())
        export_model(gpt2, root / "gpt2exp", tokenizer=tiny_tokenizer())
    inject_file(root / "exp")
    shutil.copytree(root / "gpt2exp", root / "stale")
    shutil.copy(root / "exp" / "model_kvcache.onnx", root / "stale" / "model_kvcache.onnx")
    shutil.copytree(root / "exp", root / "mismatch")
    shutil.copy(root / "gpt2" / "config.json", root / "mismatch" / "config.json")
    (root / "noise").mkdir()
    (root / "noise" / "model.onnx").write_bytes(bytes(range(7, 256)) * 40)
    shutil.copy(root / "llama" / "config.json", root / "noise" / "config.json")
    (root / "bertonnx").mkdir()
    shutil.copy(root / "exp" / "model.onnx", root / "bertonnx" / "model.onnx")
    shutil.copy(root / "bert" / "config.json", root / "bertonnx" / "config.json")
    (root / "noconf").mkdir()
    shutil.copy(root / "exp" / "model_kvcache.onnx", root / "noconf" / "model_kvcache.onnx")
    (root / "afile").write_text("a file where a directory is expected\n")
    return root


def fingerprint(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (directories as ``"<dir>"``)."""
    prints: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        prints[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return prints

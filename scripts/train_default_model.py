#!/usr/bin/env python3
"""Train the bundled default model end to end: corpus -> tokenizer -> training -> save -> train_log.json.

    PYTHONPATH=src python3 scripts/train_default_model.py --preset cpu --out OUT_DIR    # the shipped model
    PYTHONPATH=src python3 scripts/train_default_model.py --preset smoke --out /tmp/m   # ~1 min, for tests
    PYTHONPATH=src python3 scripts/train_default_model.py --preset cpu --set lr=0.002 --out OUT  # a variant
    PYTHONPATH=src python3 scripts/train_default_model.py --write-eval-splits            # refresh eval data

A GPU runs a CPU recipe step for step with ``--device cuda --precision fp32 --set budget_s=1e9`` (the planned
steps then end the run): that is how scripts/sweep_default_model.py compares recipe variants side by side.

Everything is offline and seeded. The prose comes from the Python installation (kvcache.models.corpus); the
synthetic long-context documents (passkey, key-value and multi-needle retrieval) come from
kvcache.bench.tasks with training seeds (evaluation uses a disjoint seed range). Every batch is a pure
function of (seed, step), so the data does not depend on the number of loader workers.

Presets are recipes (model size, data mix, schedule, attention priors); ``--set FIELD=VALUE`` overrides any
field, and train_log.json records the full recipe that ran. Training stops at
the planned step count or at the time budget, whichever comes first: the learning-rate schedule follows
progress = max(step / steps, elapsed / budget), so a slower machine still ends on a decayed learning rate
(train_log.json records which limit ended the run).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from standalone import ROOT, load_module, write_text  # scripts/ is on sys.path when a script runs

_tasks = load_module("kvcache_bench_tasks", "bench/tasks.py")
_corpus = load_module("kvcache_models_corpus", "models/corpus.py")

TRAIN_SEED_BASE, Filler, make_task = _tasks.TRAIN_SEED_BASE, _tasks.Filler, _tasks.make_task
Document, build_corpus, load_eval_split = _corpus.Document, _corpus.build_corpus, _corpus.load_eval_split
prose_paragraphs, split_sentences = _corpus.prose_paragraphs, _corpus.split_sentences
eval_split_text = _corpus.eval_split_text

DEFAULT_DIR = ROOT / "src" / "kvcache" / "models" / "default"
EVAL_DIR = DEFAULT_DIR / "eval"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, as in kvcache.models.random
PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class Preset:
    """One training recipe (same data and model across presets; size of the run differs)."""

    steps: int              # planned optimizer steps
    batch: int              # rows per step at seq_len (a long step uses batch // 2 rows of 2 * seq_len)
    seq_len: int            # training sequence length of most steps
    long_every: int         # every long_every-th step trains at 2 * seq_len (0: never)
    lr: float
    warmup: int
    budget_s: float         # wall-time budget for the training loop
    log_every: int
    layers: int = 6
    hidden: int = 320
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 768
    vocab: int = 4096
    max_positions: int = 2048
    rope_theta: float = 10000.0
    attention_bias: bool = False   # q/k/v/o biases (with RoPE, q.k biases score relative positions)
    prev_token_heads: int = 0      # layer-0 query heads that start as previous-token heads (see init_priors)
    mimetic: bool = False          # mimetic attention initialisation (see init_priors)
    # (layer, query head) pairs whose attention gets an auxiliary copying target (see induction_targets)
    induction_heads: tuple[tuple[int, int], ...] = ()
    induction_weight: float = 0.5  # weight of that auxiliary loss
    prose_fraction: float = 0.05   # share of rows that are prose (full LM loss); the rest are retrieval tasks
    answer_weight: float = 4.0     # loss weight of an answer token
    filler_weight: float = 0.0     # loss weight of the prose filler inside task rows (see Batches.row)
    valid_every: int = 100         # steps between validation-loss measurements
    valid_tokens: int = 32_768     # validation tokens per measurement
    keep_best: bool = True         # keep the lowest-validation-loss weights of the 2nd half (else the last)
    checkpoint_every: int = 0      # also save the current weights to --out every N steps (0: only at the end)
    corpus_files: int | None = None  # read only this many stdlib files (smoke preset: speed)
    task_mix: tuple[float, float, float] = (0.4, 0.3, 0.3)  # passkey, multi-needle, key-value
    repeat_filler: float = 0.35    # share of task documents whose filler is the classic repeated haystack
    copy_fraction: float = 0.0     # share of rows that are copy drills (see Batches.copy_row)
    # length curriculum: (end of phase as a fraction of the planned steps, seq_len, batch); empty: seq_len,
    # batch and long_every throughout
    curriculum: tuple[tuple[float, int, int], ...] = ()
    probe_every: int = 0           # steps between retrieval probes (see probe()); 0: never


PRESETS: dict[str, Preset] = {
    # the recipe for a 2-core CPU: 2,600 steps (64 minutes on one core here; the schedule follows
    # max(step / steps, elapsed / budget), so a slower machine stops at the 85-minute budget with every phase
    # still given its share). Small model (3.7M parameters, ~1.2-2k tokens/s on one core); retrieval-heavy
    # rows with loss on every token, copy drills, a length curriculum 256 -> 512 -> 1024 whose 1024 phase is
    # the last 55% of the run, and the two things that make copying heads form within a CPU run at all:
    # previous-token priors in layer 0 (init_priors) and an auxiliary attention target for two heads
    # (InductionLoss). Without them, runs of up to 43 minutes here showed no copying at all. rope_theta 1e5
    # (not 1e4): more slowly rotating RoPE pairs keep content matches strong over ~1000 tokens; with 1e4,
    # passkeys placed ~1000 tokens back were found in only 20-65% of prompts (docs/default_model.md has the
    # sweep that chose every value here: scripts/sweep_default_model.py).
    "cpu": Preset(steps=2600, batch=4, seq_len=1024, long_every=0, lr=3e-3, warmup=100, budget_s=5100.0,
                  log_every=50, layers=4, hidden=256, heads=8, kv_heads=2, ffn=640, vocab=4096,
                  rope_theta=100000.0, attention_bias=True, prev_token_heads=2,
                  induction_heads=((1, 4), (2, 4)), induction_weight=0.5, prose_fraction=0.2,
                  copy_fraction=0.25, filler_weight=1.0, valid_every=400, valid_tokens=8192, keep_best=False,
                  checkpoint_every=250, task_mix=(0.8, 0.1, 0.1), probe_every=100,
                  curriculum=((0.25, 256, 8), (0.45, 512, 4), (1.0, 1024, 2))),
    # a larger recipe for one H100/H200 (~3-4 min, bf16 autocast). This exact version has not run: its GPU
    # trials were earlier variants (loss everywhere: retrieval learnt, prose memorised; commit c430864, loss
    # on answers only: no retrieval). Next GPU job: this preset with --filler-weight 0 and 0.25 side by side
    # and `eval_default_model.py A B --into OUT` to keep the better one.
    "gpu": Preset(steps=4000, batch=32, seq_len=1024, long_every=4, lr=2e-3, warmup=150, budget_s=200.0,
                  log_every=100),
    # proves the pipeline runs (tests, CI): a minute or less, tiny model, short sequences
    "smoke": Preset(steps=8, batch=4, seq_len=256, long_every=4, lr=2e-3, warmup=2, budget_s=30.0,
                    log_every=4, layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512,
                    max_positions=512, prose_fraction=0.5, valid_every=4, valid_tokens=2048,
                    corpus_files=40),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data


def eval_splits() -> tuple[list[Document], list[Document]]:
    """The shipped held-out splits (prose for perplexity, documents for summarisation checks)."""
    return load_eval_split(EVAL_DIR / "prose.jsonl"), load_eval_split(EVAL_DIR / "documents.jsonl")


def write_eval_splits() -> None:
    corpus = build_corpus()
    write_text(EVAL_DIR / "prose.jsonl", eval_split_text(corpus.heldout_prose))
    write_text(EVAL_DIR / "documents.jsonl", eval_split_text(corpus.heldout_docs))
    log(f"wrote {len(corpus.heldout_prose)} held-out prose and {len(corpus.heldout_docs)} documents "
        f"to {EVAL_DIR}")


def sentences_of(docs: list[Document]) -> list[str]:
    return [s for d in docs for p in prose_paragraphs(d.text) for s in split_sentences(p)]


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE with single-digit numbers (so numbers copy digit by digit) and BOS added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def save_tokenizer(tok, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": max_len, "padding_side": "left",
        "add_bos_token": True, "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def induction_targets(ids: list[int]) -> list[int]:
    """Where a copying (induction) head at each input position should look: a list of ``len(ids) - 1``.

    Position ``t`` of the model input (``ids[:-1]``) gets target ``j + 1`` when ``j < t`` is the latest
    position with the same two tokens (``ids[j - 1:j + 1] == ids[t - 1:t + 1]``) and the token after it is
    the one to predict (``ids[j + 1] == ids[t + 1]``): looking there and copying is right. Elsewhere -1.
    Pads never match. In this data the targets fall on repeated copy-drill spans, the second statement of a
    needle's key, retrieval answers, and repeated phrases of prose and filler.
    """
    out = [-1] * (len(ids) - 1)
    last: dict[tuple[int, int], int] = {}
    for t in range(1, len(ids) - 1):
        pair = (ids[t - 1], ids[t])
        j = last.get(pair)
        if j is not None and ids[j + 1] == ids[t + 1] and PAD not in pair:
            out[t] = j + 1
        last[pair] = t
    return out


class Batches(torch.utils.data.IterableDataset):
    """Training batches; batch ``step`` is a pure function of (seed, step).

    Worker w of W makes steps w, w+W, ...; the loader interleaves workers in order, so steps arrive in order.
    """

    def __init__(self, tok, prose_ids: list[int], sentences: list[str], preset: Preset, seed: int,
                 first_step: int, last_step: int) -> None:
        self.tok, self.prose, self.p, self.seed = tok, prose_ids, preset, seed
        self.sentences, self.first, self.last = sentences, first_step, last_step
        self._fillers: tuple[Filler, Filler] | None = None
        self._words: list[str] | None = None

    def fillers(self) -> tuple[Filler, Filler]:
        if self._fillers is None:  # built lazily, in the worker
            def count(xs: list[str]) -> list[int]:
                return [len(e.ids) for e in self.tok.encode_batch(xs, add_special_tokens=False)]
            self._fillers = (Filler(self.sentences, count), Filler.repeat(count))
        return self._fillers

    def shape(self, step: int, progress: float | None = None) -> tuple[int, int]:
        """(rows, sequence length) of batch ``step``; a curriculum phase follows ``progress`` if given
        (training progress in [0, 1], see main), else ``step / steps``."""
        p = self.p
        where = step / p.steps if progress is None else progress
        for end, seq_len, batch in p.curriculum:
            if where < end:
                return batch, seq_len
        if p.curriculum:
            return p.curriculum[-1][2], p.curriculum[-1][1]
        if p.long_every and step % p.long_every == p.long_every - 1:
            return max(1, p.batch // 2), 2 * p.seq_len
        return p.batch, p.seq_len

    def row(self, rng: random.Random, length: int, step: int, r: int) -> tuple[list[int], list[float]]:
        """One row of ``length + 1`` tokens: prose (loss everywhere) or one task document.

        The prose corpus is small (~0.4M tokens), so prose rows are rationed (``prose_fraction``) and task
        rows put no loss on their prose filler: otherwise the model memorises the filler sentences, which
        costs held-out perplexity. The task text itself (instructions, needles that state their key twice,
        key-value lines, the question) and the repeated-haystack filler keep their loss: their short-range
        repetitions are what grows the copying (induction) heads that long-range retrieval builds on; with
        loss on the answer alone a trial run never learnt retrieval. A task row is padded after its answer
        (pads carry no loss and, coming later in the row, are never attended to by the task's tokens).
        """
        u = rng.random()
        if self.p.prose_fraction <= u < self.p.prose_fraction + self.p.copy_fraction:
            return self.copy_row(rng, length)
        if u < self.p.prose_fraction:
            start = rng.randrange(len(self.prose))
            ids: list[int] = []
            while len(ids) < length + 1:  # wraps around the corpus
                ids += self.prose[start:start + length + 1 - len(ids)]
                start = 0
            return ids, [1.0] * len(ids)
        prose, repeat = self.fillers()
        kind = rng.choices(("passkey", "multi_needle", "kv"), weights=self.p.task_mix)[0]
        # half the contexts anywhere in [64, L), half near full length: less padding, more long contexts
        low = (256 if kind == "multi_needle" else 64) if rng.random() < 0.5 else (3 * length) // 4
        ctx = rng.randrange(min(low, length // 2), length - 16)
        task_seed = TRAIN_SEED_BASE + (self.seed * 100_000 + step) * 1000 + r  # < EVAL_SEED_BASE
        use_prose = rng.random() >= self.p.repeat_filler
        try:
            ex = make_task(kind, prose if use_prose else repeat, ctx, seed=task_seed)
        except ValueError:  # a context too short for this many needles (short rows of the smoke preset)
            return [PAD] * (length + 1), [0.0] * (length + 1)
        enc = self.tok.encode(ex.prompt)  # with BOS, as at evaluation
        filler = bytearray(len(ex.prompt) + 1)
        if use_prose:
            for a, b in ex.filler_spans:
                filler[a:b] = b"\x01" * (b - a)
        # special tokens (BOS) have offsets (0, 0): weight them like task text
        fw = self.p.filler_weight
        prompt_w = [fw if filler[start] and end > start else 1.0 for start, end in enc.offsets]
        if len(enc.ids) > length - 8:  # only with a tiny vocabulary (smoke preset): the question would be cut
            return [PAD] * (length + 1), [0.0] * (length + 1)
        prompt = enc.ids
        answer = self.tok.encode(ex.answer, add_special_tokens=False).ids + [EOS]
        ids = prompt + answer
        weights = prompt_w + [self.p.answer_weight] * len(answer)
        pad = length + 1 - len(ids)
        return ids + [PAD] * pad, weights + [0.0] * pad

    def copy_row(self, rng: random.Random, length: int) -> tuple[list[int], list[float]]:
        """A span of random words and 5-digit numbers, repeated line after line to the end of the row.

        Every copy after the first is predictable only by looking back (the span is random), so these rows
        give a dense signal for copying (induction) heads, which passkey retrieval is built on; task rows
        alone carry about ten such tokens each, and a CPU run cannot afford to wait for them.
        """
        if self._words is None:
            self._words = sorted({w for s in self.sentences for w in s.split() if w.isalpha()})
        n_items = rng.randrange(3, max(4, length // 12))
        items = [str(rng.randrange(10_000, 100_000)) if rng.random() < 0.5 else rng.choice(self._words)
                 for _ in range(n_items)]
        span = " ".join(items)
        text = "\n".join([span] * (2 + length // max(1, 2 * n_items)))
        ids = self.tok.encode(text).ids[:length + 1]
        pad = length + 1 - len(ids)
        return ids + [PAD] * pad, [1.0] * len(ids) + [0.0] * pad

    def make(self, step: int, progress: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, L + 1), loss weights (B, L + 1), copying targets (B, L), see induction_targets)."""
        batch, length = self.shape(step, progress)
        rng = random.Random(f"{self.seed}:{step}")
        rows = [self.row(rng, length, step, r) for r in range(batch)]
        targets = [induction_targets(r[0]) if self.p.induction_heads else [-1] * length for r in rows]
        return (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                torch.tensor(targets))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.first + wid, self.last, nw):
            yield self.make(step)


# ---------------------------------------------------------------------------------------------- model


def build_model(p: Preset, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.ffn, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, max_position_embeddings=p.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta}, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, rms_norm_eps=1e-5, initializer_range=0.02,
        attention_bias=p.attention_bias, attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def init_priors(model, p: Preset) -> None:
    """Structured initialisation of the attention, so copying (induction) heads can form within a CPU run.

    A copying head needs two parts that only help together: a head that moves each token's identity to the
    next position (previous-token head) and a head that matches the current token against it and copies what
    follows. From a random start that takes far longer than a 2-core CPU run (measured: no copying after
    ~4M tokens), so two priors give both parts a head start; every weight is then trained as usual.

    - ``prev_token_heads``: in layer 0, the first N query heads (and their shared KV head) get q/k biases
      whose RoPE scores peak at relative position -1: ``b_k`` is ``(a, 0)`` in every rotation pair and ``b_q``
      is ``b_k`` rotated by ``-theta_i``, so ``score(delta) ~ a^2 * sum_i cos((delta - 1) * theta_i)``.
    - ``mimetic``: attention starts like a trained model's (Trockman & Kolter, 2023): each KV head's
      value projection is a random orthonormal map ``P`` and its query heads' output projections ``P^T``
      (so ``W_o W_v`` is a partial identity: heads copy what they attend to), and above layer 0 each query
      projection starts near its key projection (``W_q W_k^T`` close to positive semi-definite: heads attend
      to similar tokens).
    """
    cfg = model.config
    layers = model.model.layers
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    gen = torch.Generator().manual_seed(1234)
    if p.mimetic:
        for li, layer in enumerate(layers):
            attn = layer.self_attn
            for g in range(cfg.num_key_value_heads):
                rows = slice(g * head_dim, (g + 1) * head_dim)
                proj = torch.linalg.qr(torch.randn(cfg.hidden_size, head_dim, generator=gen))[0].T
                attn.v_proj.weight[rows] = proj.to(attn.v_proj.weight)
                for h in range(g * group, (g + 1) * group):
                    cols = slice(h * head_dim, (h + 1) * head_dim)
                    attn.o_proj.weight[:, cols] = proj.T.to(attn.o_proj.weight) / group
                    if li > 0:
                        attn.q_proj.weight[cols] = attn.k_proj.weight[rows] + 0.5 * attn.q_proj.weight[cols]
    if p.prev_token_heads:
        if not p.attention_bias:
            raise ValueError("prev_token_heads needs attention_bias=True (the prior lives in the q/k biases)")
        if p.prev_token_heads > group:
            raise ValueError(f"prev_token_heads must be <= {group} (query heads sharing the first KV head)")
        attn = layers[0].self_attn
        theta = p.rope_theta ** (-torch.arange(head_dim // 2) * 2 / head_dim)
        amp = 8.0
        b_k = torch.zeros(head_dim)
        b_k[: head_dim // 2] = amp
        b_q = torch.cat([amp * torch.cos(theta), -amp * torch.sin(theta)])
        attn.k_proj.bias[:head_dim] = b_k.to(attn.k_proj.bias)
        for h in range(p.prev_token_heads):
            attn.q_proj.bias[h * head_dim:(h + 1) * head_dim] = b_q.to(attn.q_proj.bias)


class InductionLoss:
    """Auxiliary loss that teaches chosen heads to attend where copying is right (induction_targets).

    Hooks capture the chosen layers' query and key projections in the normal forward pass; the heads'
    attention log-probabilities are recomputed from them (RoPE and causal mask as in the model) and the
    loss is the mean negative log-probability of the target positions. Without it, the attention pattern
    that retrieval needs has to be found by chance first, which a CPU run cannot wait for.
    """

    def __init__(self, model, heads: tuple[tuple[int, int], ...]) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model, self.heads, self.rope = model, heads, apply_rotary_pos_emb
        cfg = model.config
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.captured: dict[tuple[int, str], torch.Tensor] = {}
        for layer in sorted({li for li, _ in heads}):
            attn = model.model.layers[layer].self_attn
            for name in ("q_proj", "k_proj"):
                getattr(attn, name).register_forward_hook(self._hook(layer, name))

    def _hook(self, layer: int, name: str):
        def hook(module, args, output):
            self.captured[(layer, name)] = output
        return hook

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """targets: (B, T) target key positions, -1 where there is none. Returns a scalar loss."""
        mask = targets >= 0
        if not mask.any():
            return targets.new_zeros((), dtype=torch.float32)
        b, t = targets.shape
        positions = torch.arange(t, device=targets.device).expand(b, t)
        cos, sin = self.model.model.rotary_emb(self.captured[(self.heads[0][0], "q_proj")], positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=targets.device).tril()
        total = targets.new_zeros((), dtype=torch.float32)
        d = self.head_dim
        for layer, head in self.heads:
            g = head // self.group
            q = self.captured[(layer, "q_proj")][..., head * d:(head + 1) * d].unsqueeze(1)  # (B, 1, T, d)
            k = self.captured[(layer, "k_proj")][..., g * d:(g + 1) * d].unsqueeze(1)
            q, k = self.rope(q, k, cos, sin)
            scores = (q @ k.transpose(-1, -2)).squeeze(1).float() / d ** 0.5  # (B, T, T)
            logp = scores.masked_fill(~causal, float("-inf")).log_softmax(-1)
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total = total - picked[mask].mean()
        self.captured.clear()
        return total / len(self.heads)


def is_valid_doc(doc: Document) -> bool:
    """About 2% of the training documents are kept aside to measure validation loss during training."""
    return hashlib.sha256(f"valid:{doc.key}".encode()).digest()[0] < 6


@torch.no_grad()
def valid_loss(model, stream: torch.Tensor, window: int, amp) -> float:
    """Mean next-token loss over ``stream`` (1-D token ids on the model's device) in windows of ``window``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, stream.numel() - 1, window):
        ids = stream[i:i + window + 1].unsqueeze(0)
        if ids.shape[1] < 2:
            break
        with amp:
            logits = model(input_ids=ids[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.float()[0], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    model.train()
    return total / max(1, count)


PROBE_SEED_BASE = 1_500_000_000  # disjoint from training seeds and from the evaluation's first seeds


@dataclass(frozen=True)
class ProbeSet:
    """The fixed inputs of :func:`probe`, built once per run.

    ``passkey``: per context, right-padded ids (n, width) and each row's answer span ``(start, end)``;
    ``copy``: (n, 97) ids, BOS then a random 48-token sequence twice.
    """

    passkey: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]]
    copy: torch.Tensor


def probe_set(tok, filler: Filler, contexts: tuple[int, ...], n: int, device: torch.device) -> ProbeSet:
    """``n`` passkey prompts per context (probe seeds) and ``n`` random copy sequences, as tensors."""
    passkey = {}
    for ctx in contexts:
        rows, spans = [], []
        for i in range(n):
            ex = make_task("passkey", filler, ctx, seed=PROBE_SEED_BASE + ctx * 1000 + i)
            prompt = tok.encode(ex.prompt).ids
            answer = tok.encode(ex.answer, add_special_tokens=False).ids
            rows.append(prompt + answer)
            spans.append((len(prompt), len(prompt) + len(answer)))
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows], device=device)  # right padding
        passkey[ctx] = (ids, spans)
    g = torch.Generator().manual_seed(PROBE_SEED_BASE)
    seq = torch.randint(len(SPECIALS), tok.get_vocab_size(), (n, 48), generator=g)
    return ProbeSet(passkey, torch.cat([torch.full((n, 1), BOS), seq, seq], dim=1).to(device))


@torch.no_grad()
def probe(model, probes: ProbeSet) -> dict:
    """Cheap progress signals, teacher-forced (one forward pass per prompt batch, no generation).

    ``passkey@C``: share of the passkey prompts of ``C`` tokens whose every answer token is the argmax.
    ``copy``: next-token accuracy on the second copy of a random 48-token sequence: what copying (induction)
    heads, the mechanism behind retrieval, make possible.
    """
    model.eval()
    out: dict = {}
    for ctx, (ids, spans) in probes.passkey.items():
        ok = 0
        for b in range(0, len(spans), 8):
            pred = model(input_ids=ids[b:b + 8]).logits.argmax(-1)
            for j, (a, e) in enumerate(spans[b:b + 8]):
                ok += bool((pred[j, a - 1:e - 1] == ids[b + j, a:e]).all())
        out[f"passkey@{ctx}"] = round(ok / len(spans), 3)
    ids = probes.copy
    pred = model(input_ids=ids).logits.argmax(-1)
    out["copy"] = round((pred[:, 48:-1] == ids[:, 49:]).float().mean().item(), 3)
    model.train()
    return out


def lr_at(progress: float, p: Preset, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, p.warmup))
    return p.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_model(model, tok, out: Path, p: Preset) -> None:
    """Write weights (fp16 safetensors, loaded as float32), configs and tokenizer, each file atomically."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # a copy: the model may still be training (periodic checkpoints)
    model = copy.deepcopy(model).to("cpu", torch.float16)  # fp16: 10 mantissa bits (bf16: 7); in range
    model.generation_config.do_sample = False
    model.generation_config.max_length = None
    model.save_pretrained(tmp, safe_serialization=True)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["dtype"] = "float32"  # dtype="auto" (the default) then loads a float32 model
    cfg.pop("attn_implementation", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tok, tmp, p.max_positions)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def git_commit() -> str | None:
    """The checkout's commit, so the card can say how to reproduce the run (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--out", type=Path, help="output directory (created; files replaced atomically)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 autocast on CUDA, fp32 on CPU; fp32 on CUDA reproduces a CPU recipe")
    ap.add_argument("--steps", type=int, help="override the preset's step count")
    ap.add_argument("--budget-s", type=float, help="override the preset's training time budget (seconds)")
    ap.add_argument("--filler-weight", type=float,
                    help="override the loss weight of prose filler in task rows")
    ap.add_argument("--workers", type=int,
                    help="data loader workers (default: min(10, cpus - 2) on GPU, 0 on CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any recipe field (repeatable), e.g. --set layers=4 --set lr=0.003; "
                         "tuples as Python literals")
    ap.add_argument("--write-eval-splits", action="store_true",
                    help="rewrite the shipped held-out splits and exit")
    return ap


def recipe(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Preset:
    """The preset named by ``--preset`` with the command line's overrides applied."""
    overrides = {"steps": args.steps, "budget_s": args.budget_s, "filler_weight": args.filler_weight}
    fields = asdict(PRESETS[args.preset])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of: {', '.join(fields)}")
        try:
            parsed = ast.literal_eval(value)
            overrides[key] = parsed if fields[key] is None else type(fields[key])(parsed)
        except (ValueError, SyntaxError, TypeError) as e:
            ap.error(f"--set {item!r}: {value!r} is not a valid {type(fields[key]).__name__} ({e})")
    return Preset(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.write_eval_splits:
        write_eval_splits()
        return 0
    if args.out is None:
        ap.error("--out is required")
    p = recipe(args, ap)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    t0 = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    heldout_prose, heldout_docs = eval_splits()
    corpus = build_corpus(max_files=p.corpus_files, exclude=heldout_prose + heldout_docs)
    valid_docs = [d for d in corpus.train if is_valid_doc(d)]
    train_docs = [d for d in corpus.train if not is_valid_doc(d)]
    texts = [d.text for d in train_docs]
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    log(f"corpus: {len(texts)} training documents, {sum(map(len, texts))} chars (sha256 {digest}), "
        f"{len(heldout_prose)} held-out prose, {len(heldout_docs)} held-out documents")
    t_corpus = time.time() - t0

    # tokenizer: the prose plus a few hundred task documents, so the templates get their own merges
    sentences = sentences_of(train_docs)
    def rough_count(xs: list[str]) -> list[int]:
        return [max(1, len(x) // 4) for x in xs]
    rough = Filler(sentences, rough_count)
    task_texts = [make_task(k, rough, 256, seed=TRAIN_SEED_BASE + i).prompt
                  for i in range(300) for k in ("passkey", "multi_needle", "kv")]
    tok = train_tokenizer(texts + task_texts, p.vocab)
    prose_ids: list[int] = []
    for enc in tok.encode_batch(texts):  # BOS added by the post-processor
        prose_ids += enc.ids + [EOS]
    valid_ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in valid_docs]):
        valid_ids += enc.ids + [EOS]
    log(f"tokenizer: vocab {tok.get_vocab_size()}, prose {len(prose_ids)} tokens "
        f"({sum(map(len, texts)) / len(prose_ids):.2f} chars/token)")
    t_tok = time.time() - t0 - t_corpus

    model = build_model(p, "sdpa")
    init_priors(model, p)
    model = model.to(device)
    n_params = sum(t.numel() for t in model.parameters())
    log(f"model: LlamaForCausalLM {n_params / 1e6:.2f}M parameters on {device}")
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    workers = args.workers if args.workers is not None else (
        min(10, (os.cpu_count() or 2) - 2) if device.type == "cuda" else 0)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the loader forks after the tokenizer was used
    data = Batches(tok, prose_ids, sentences, p, args.seed, 0, p.steps)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    valid_stream = torch.tensor(valid_ids[:p.valid_tokens], device=device)
    best: dict = {"loss": float("inf"), "step": -1, "state": None}
    valid_curve: list[dict] = []
    probe_curve: list[dict] = []
    probes = None
    if p.probe_every:
        probe_filler = Filler(sentences_of(heldout_prose), lambda xs: [
            len(e.ids) for e in tok.encode_batch(xs, add_special_tokens=False)])
        probes = probe_set(tok, probe_filler, tuple(c for c in (256, 1024) if c <= p.max_positions), 32,
                           device)

    def validate(step: int, progress: float) -> None:
        vl = valid_loss(model, valid_stream, p.seq_len, amp)
        valid_curve.append({"step": step, "valid_loss": round(vl, 4)})
        log(f"step {step:5d} validation loss {vl:.4f} (perplexity {math.exp(vl):.1f})")
        # the best checkpoint is chosen from the second half only: retrieval is learnt by then
        if p.keep_best and progress >= 0.5 and vl < best["loss"]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best.update(loss=vl, step=step, state=state)

    def save(steps_done: int, stop_reason: str, train_s: float, *, final: bool) -> None:
        """Weights + train_log.json into --out; also used for periodic checkpoints (final=False)."""
        save_model(model, tok, args.out, p)
        train_log = {
            "preset": args.preset, "recipe": asdict(p), "seed": args.seed, "final": final,
            "commit": git_commit(),
            "steps": steps_done, "planned_steps": p.steps, "stopped_by": stop_reason,
            "tokens_seen": tokens, "prose_tokens_seen": int(prose_tokens.item()),
            "prose_epochs": round(prose_tokens.item() / max(1, len(prose_ids)), 2),
            "tokens_per_s": round(tokens / max(train_s, 1e-9)),
            "wall_time_s": {"corpus": round(t_corpus, 1), "tokenizer": round(t_tok, 1),
                            "train": round(train_s, 1), "total": round(time.time() - t0, 1)},
            "final_loss": round(sum(recent[-3:]) / max(1, len(recent[-3:])), 4) if recent else None,
            "kept_step": best["step"], "kept_valid_loss": round(best["loss"], 4),
            "valid_tokens": int(valid_stream.numel()), "valid_curve": valid_curve,
            "probe_curve": probe_curve,
            "param_count": n_params,
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else platform.processor() or "cpu"),
            "precision": "bf16 autocast" if bf16 else "fp32",
            "cpu_threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__,
                         "tokenizers": __import__("tokenizers").__version__},
            "corpus": {"train_documents": len(texts), "valid_documents": len(valid_docs),
                       "train_chars": sum(map(len, texts)),
                       "train_prose_tokens": len(prose_ids), "sha256": digest,
                       "sources": sorted({d.source for d in corpus.train}),
                       "heldout_prose_documents": len(heldout_prose),
                       "heldout_documents": len(heldout_docs)},
            "history": history,
        }
        write_json(args.out / "train_log.json", train_log)

    model.train()
    t_train = time.time()
    history: list[dict] = []
    recent: list[float] = []
    tokens = 0
    prose_tokens = torch.zeros((), dtype=torch.long, device=device)
    step = 0
    stop_reason = "steps"
    window_t, window_tokens = time.time(), 0
    def in_process():
        """Batches made in this process, the curriculum following the same progress as the learning rate:
        on a slow or busy CPU the time budget ends the run early, and every phase still gets its share."""
        for s in range(p.steps):
            yield data.make(s, max(s / p.steps, (time.time() - t_train) / p.budget_s))

    induction = InductionLoss(model, p.induction_heads) if p.induction_heads else None
    for step, (ids, w, targets) in enumerate(in_process() if workers == 0 and p.curriculum else loader):
        elapsed = time.time() - t_train
        progress = max(step / p.steps, elapsed / p.budget_s)
        if progress >= 1.0:
            stop_reason = "time budget"
            break
        lr = lr_at(progress, p, step)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, w = ids.to(device, non_blocking=True), w.to(device, non_blocking=True)
        with amp:
            logits = model(input_ids=ids[:, :-1]).logits
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(),
                                               reduction="none")
        loss = (ce * w[:, 1:].flatten()).sum() / w[:, 1:].sum()
        aux = None
        if induction is not None:
            aux = induction(targets.to(device, non_blocking=True))
            loss = loss + p.induction_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids[:, :-1].numel()
        # prose rows are the only ones weighted 1 throughout (task rows hold answers, weighted otherwise)
        prose_tokens += (w[:, 1:] == 1.0).all(dim=1).sum() * (ids.shape[1] - 1)
        window_tokens += ids[:, :-1].numel()
        if step > 0 and step % p.valid_every == 0:
            validate(step, progress)
        if probes is not None and step > 0 and step % p.probe_every == 0:
            probe_curve.append({"step": step, **probe(model, probes)})
            log(f"step {step:5d} probe {probe_curve[-1]}")
        if p.checkpoint_every and step > 0 and step % p.checkpoint_every == 0:
            if not p.keep_best:  # the checkpoint is the current weights
                best.update(step=step, loss=valid_curve[-1]["valid_loss"] if valid_curve else float("nan"))
            save(step, "checkpoint", time.time() - t_train, final=False)
            log(f"step {step:5d} checkpoint saved to {args.out}")
        if step % p.log_every == 0 or step == p.steps - 1:
            value = loss.item()  # syncs; only on log steps
            recent.append(value)
            now = time.time()
            tps = window_tokens / max(1e-9, now - window_t)
            window_t, window_tokens = now, 0
            history.append({"step": step, "loss": round(value, 4), "lr": lr, "seq_len": ids.shape[1] - 1,
                            "tokens_per_s": round(tps), "elapsed_s": round(now - t_train, 1)})
            extra = ""
            if aux is not None:
                history[-1]["induction_loss"] = round(aux.item(), 4)
                extra = f" (induction {aux.item():.3f})"
            log(f"step {step:5d}/{p.steps} len {ids.shape[1] - 1:4d} loss {value:.4f}{extra} lr {lr:.2e} "
                f"{tps:,.0f} tok/s")
    steps_done = step + (1 if stop_reason == "steps" else 0)
    train_s = time.time() - t_train
    log(f"trained {steps_done} steps in {train_s:.1f}s ({tokens / max(train_s, 1e-9):,.0f} tok/s), "
        f"stopped by {stop_reason}")

    validate(steps_done, 1.0)
    if best["state"] is not None and best["step"] != steps_done:
        model.load_state_dict(best["state"])
        log(f"keeping the step-{best['step']} weights (lowest validation loss, {best['loss']:.4f})")
    else:
        best.update(step=steps_done, loss=valid_curve[-1]["valid_loss"])
    model.eval()
    save(steps_done, stop_reason, train_s, final=True)
    log(f"saved to {args.out} ({time.time() - t0:.1f}s total)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

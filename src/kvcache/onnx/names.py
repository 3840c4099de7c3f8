"""Input/output names and dimension names of exported and injected ONNX decoder graphs, in one place.

The names follow the conventions of Optimum and onnxruntime-genai so that tools written for those graphs
work on ours.

Graph inputs
------------
``input_ids``            int64 ``[batch, sequence]`` — the current tokens only.
``attention_mask``       int64 ``[batch, total]`` with ``total = past + sequence``: 1 = attend, 0 = padding
                         or an empty slot. Columns follow the *physical* cache slots (the first ``past``
                         columns describe ``past_key_values.*``, the last ``sequence`` the current tokens).
``position_ids``         int64 ``[batch, sequence]``, only for architectures that use positions (all but
                         the ALiBi ones, bloom and mpt: :data:`kvcache.onnx.export.NO_POSITION_IDS`);
                         present iff the graph has this input. LOGICAL positions of the
                         current tokens: the count of real tokens seen before each one (Hugging Face's
                         ``cumsum(mask) - 1``; padding slots get 1). After a retention policy evicted
                         tokens, positions keep counting tokens *seen*, not slots kept.
``past_key_values.{i}.key`` / ``.value``  float ``[batch, num_kv_heads, past, head_dim]`` — keys after the
                         position encoding (RoPE), values as projected. ``num_kv_heads`` is the GQA count, so
                         the GQA memory saving is kept. ``past`` may be 0 (first step / prefill).

``slot_mask.{i}``         (only with ``--policies``) bool ``[batch, num_kv_heads, sequence, past + sequence]``
                         per layer: True where query ``q`` may attend slot ``s`` of KV head ``h``. Built
                         by the host from the logical position of every slot (causality, padding, sliding
                         window: :func:`kvcache.masks.slot_mask`), so that after a retention policy kept
                         different tokens per layer, sequence and KV head, evicting a token is exactly
                         masking it. It replaces the causal + padding mask built from ``attention_mask``.

Graph outputs
-------------
``logits``               float ``[batch, sequence, vocab]``.
``present.{i}.key`` / ``.value``  ``[batch, num_kv_heads, past + sequence, head_dim]`` = past ++ current.
``attn_scores.{i}``      (only with ``--attention-stats``) float ``[batch, num_heads, past + sequence]``:
                         the attention probabilities (softmax over keys, padding and future keys masked) of
                         the current queries, summed over the query rows that are real tokens (padding rows
                         left out), per *query* head. A host-side policy reduces query heads to KV heads
                         itself (``num_heads // num_kv_heads`` per group) and accumulates across steps.

``attn_logits.{i}``      (only with ``--policies``) float ``[batch, num_heads, sequence, past + sequence]``:
                         the masked attention logits (the softmax input; masked entries at the dtype's most
                         negative value) of every current query, per *query* head: a host-side policy
                         derives what it asks for from them (weights, last rows, sums, Keyformer's Gumbel
                         softmax), as the PyTorch attention function does from its own logits.

Causal rule of injected graphs: query ``i`` of the current chunk (0-based) attends to every past slot
whose mask is 1 and to current tokens ``j <= i`` whose mask is 1.

Model metadata (``ModelProto.metadata_props``) written by the injector is under :data:`META_PREFIX`.
"""

from __future__ import annotations

import re

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
ATTN_SCORES_PREFIX = "attn_scores"
ATTN_LOGITS_PREFIX = "attn_logits"
SLOT_MASK_PREFIX = "slot_mask"

# symbolic dimension names
BATCH_DIM = "batch_size"
SEQUENCE_DIM = "sequence_length"
PAST_DIM = "past_sequence_length"
TOTAL_DIM = "total_sequence_length"

#: prefix of the metadata keys the injector writes (values are strings)
META_PREFIX = "kvcache."
#: metadata keys: "1" once injected; architecture (``config.model_type``); layer/head counts; head size
#: (KV heads and head size: one number, or one per layer, comma-separated, when layers differ);
#: "1" when ``attn_scores.{i}`` outputs exist
META_INJECTED = META_PREFIX + "injected"
META_ARCHITECTURE = META_PREFIX + "architecture"
META_NUM_LAYERS = META_PREFIX + "num_layers"
META_NUM_HEADS = META_PREFIX + "num_heads"
META_NUM_KV_HEADS = META_PREFIX + "num_kv_heads"
META_HEAD_DIM = META_PREFIX + "head_dim"
META_ATTENTION_STATS = META_PREFIX + "attention_stats"
#: "1" when the graph takes ``slot_mask.{i}`` inputs and returns ``attn_logits.{i}`` (``--policies``)
META_POLICIES = META_PREFIX + "policies"
#: "1" when every attention layer is ONNX Runtime's fused ``GroupQueryAttention`` (``--fused``): past and
#: present may then share one preallocated buffer (:mod:`kvcache.onnx.rewrite_fused`)
META_FUSED = META_PREFIX + "fused"
#: positions the rotary tables of a fused graph's attention op cover (the model's context length), when the
#: op rotates Q and K itself: the graph refuses ``position_ids`` at or beyond it
META_ROTARY_POSITIONS = META_PREFIX + "rotary_positions"
#: ONNX Runtime's domain of contrib operators (the fused graph's attention, rotary embedding and norm)
CONTRIB_DOMAIN = "com.microsoft"
#: file name and sha256 of the no-cache graph an injected graph was made from (checked before it runs)
META_SOURCE_FILE = META_PREFIX + "source_file"
META_SOURCE_SHA256 = META_PREFIX + "source_sha256"
#: where the original graph's positions came from: "input" (a position_ids input), "none" (ALiBi),
#: "arange" (computed: slot indices, padding included) or "cumsum" (computed: real tokens seen, OPT); the
#: last two were replaced by the ``position_ids`` input (``kvcache.onnx.rewrite_positions``)
META_POSITIONS = META_PREFIX + "positions"

_CACHE_RE = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def past_key(layer: int) -> str:
    """Name of the past-keys input of ``layer``: ``past_key_values.{layer}.key``."""
    return f"{PAST_PREFIX}.{layer}.key"


def past_value(layer: int) -> str:
    """Name of the past-values input of ``layer``: ``past_key_values.{layer}.value``."""
    return f"{PAST_PREFIX}.{layer}.value"


def present_key(layer: int) -> str:
    """Name of the present-keys output of ``layer``: ``present.{layer}.key``."""
    return f"{PRESENT_PREFIX}.{layer}.key"


def present_value(layer: int) -> str:
    """Name of the present-values output of ``layer``: ``present.{layer}.value``."""
    return f"{PRESENT_PREFIX}.{layer}.value"


def attn_scores(layer: int) -> str:
    """Name of the attention-statistics output of ``layer``: ``attn_scores.{layer}``."""
    return f"{ATTN_SCORES_PREFIX}.{layer}"


def attn_logits(layer: int) -> str:
    """Name of the masked-logits output of ``layer``: ``attn_logits.{layer}``."""
    return f"{ATTN_LOGITS_PREFIX}.{layer}"


def slot_mask(layer: int) -> str:
    """Name of the per-slot mask input of ``layer``: ``slot_mask.{layer}``."""
    return f"{SLOT_MASK_PREFIX}.{layer}"


def parse_cache_name(name: str) -> tuple[str, int, str] | None:
    """Split a cache tensor name into ``(prefix, layer, "key"|"value")``, or ``None`` if it is not one.

    >>> parse_cache_name("past_key_values.3.value")
    ('past_key_values', 3, 'value')
    """
    m = _CACHE_RE.match(name)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), m.group(3)


def is_cache_input(name: str) -> bool:
    """True for ``past_key_values.{i}.key|value``."""
    parsed = parse_cache_name(name)
    return parsed is not None and parsed[0] == PAST_PREFIX


def is_cache_output(name: str) -> bool:
    """True for ``present.{i}.key|value``."""
    parsed = parse_cache_name(name)
    return parsed is not None and parsed[0] == PRESENT_PREFIX

"""The quantized store on its own: codes and scales against a direct computation, the residual window, each
token quantized once, keep()/index_batch()/crop() against what the store held, memory against the dense
store and against the registry's estimate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.errors import CacheCapacityError, KVCacheError
from kvcache.layers import quantize_ops as ops
from kvcache.layers.dense import DynamicLayer
from kvcache.layers.quantized import QuantizedLayer
from kvcache.layers.registry import LayerShape, build_store, estimate_store
from kvcache.spec import CacheSpec

B, H, D = 2, 3, 8


def kv(t: int, b: int = B, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, t, d, generator=g) * 3, torch.randn(b, H, t, d, generator=g)


def reference_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Min/max asymmetric quantization over ``dim`` (the group), dequantized; written out directly."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round((x - lo) / scale), 0, 2**bits - 1) * scale + lo


# ----- the arithmetic ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_size(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = ops.pack(codes, bits)
    assert packed.shape == (2, 3, 5, 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(ops.unpack(packed, bits, torch.float32), codes.float())
    # a token's channels stay in its own bytes: gathering tokens commutes with packing
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(ops.pack(codes[:, :, idx], bits), packed[:, :, idx])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_keys_per_channel_and_values_per_token_match_a_direct_computation(bits: int) -> None:
    keys, values = kv(12, d=8)
    pk, ks, kz = ops.quantize_keys(keys, None, bits, group=4)
    deq_k = ops.dequantize_keys(pk, ks, kz, bits, 4, None)
    ref_k = reference_quantize(keys.reshape(B, H, 3, 4, 8), bits, dim=3).reshape(keys.shape)
    assert torch.allclose(deq_k, ref_k, atol=1e-5)
    assert ks.shape == (B, H, 3, 8)  # one scale per channel per 4 tokens
    pv, vs, vz = ops.quantize_values(values, None, bits, group=4)
    deq_v = ops.dequantize_values(pv, vs, vz, bits)
    ref_v = reference_quantize(values.reshape(B, H, 12, 2, 4), bits, dim=4).reshape(values.shape)
    assert torch.allclose(deq_v, ref_v, atol=1e-5)
    assert vs.shape == (B, H, 12, 2)  # one scale per token per 4 channels
    # the error is at most half a step
    step = (keys.reshape(B, H, 3, 4, 8).amax(3) - keys.reshape(B, H, 3, 4, 8).amin(3)) / (2**bits - 1)
    err = (deq_k - keys).abs().reshape(B, H, 3, 4, 8).amax(3)
    assert bool((err <= step / 2 + 1e-5).all())


def test_slots_without_a_token_are_left_out_of_the_key_ranges() -> None:
    keys = torch.zeros(1, 1, 4, 8)
    keys[0, 0, 0] = 1000.0  # a padding slot with an outlier
    keys[0, 0, 1:] = torch.linspace(0, 1, 3)[:, None]
    real = torch.tensor([[[False, True, True, True]]])
    pk, ks, kz = ops.quantize_keys(keys, real, 4, group=4)
    deq = ops.dequantize_keys(pk, ks, kz, 4, 4, None)
    assert torch.allclose(deq[0, 0, 1:], keys[0, 0, 1:], atol=1 / 30)


def test_scales_stored_in_half_precision_dequantize_to_what_the_codes_meant() -> None:
    keys = kv(8)[0].half()
    pk, ks, kz = ops.quantize_keys(keys, None, 8, group=8)
    assert ks.dtype == kz.dtype == torch.float16
    deq = ops.dequantize_keys(pk, ks, kz, 8, 8, None)
    step = (keys.float().amax(2, keepdim=True) - keys.float().amin(2, keepdim=True)) / 255
    assert bool(((deq.float() - keys.float()).abs() <= step / 2 + 2e-3).all())


# ----- the store -----------------------------------------------------------------------------------------
def feed(layer: QuantizedLayer, chunks: list[int], release: bool = True, seed: int = 0) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Feed chunks (releasing after each, as KVCache does); return every token fed, (B, H, T, D)."""
    ks, vs = [], []
    for i, t in enumerate(chunks):
        k, v = kv(t, seed=seed + i)
        ks.append(k)
        vs.append(v)
        layer.update(k, v)
        if release:
            layer.release()
    return torch.cat(ks, 2), torch.cat(vs, 2)


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(1, 9), min_size=1, max_size=10), bits=st.sampled_from([2, 4, 8]),
       residual=st.integers(0, 6))
def test_residual_window_and_quantized_region_against_a_direct_computation(chunks: list[int], bits: int,
                                                                          residual: int) -> None:
    group = 4
    layer = QuantizedLayer(bits, group, residual)
    keys, values = feed(layer, chunks)
    total = keys.shape[2]
    q = max(0, (total - residual) // group * group)
    assert layer.quantized_length == q and layer.physical_length == layer.seen == total
    assert residual <= total - q < residual + group or total < residual + group
    out_k, out_v = layer.keys_values()
    # the window is exact
    assert torch.equal(out_k[:, :, q:], keys[:, :, q:])
    assert torch.equal(out_v[:, :, q:], values[:, :, q:])
    # the quantized region is group quantization of exactly those tokens
    ref_k = reference_quantize(keys[:, :, :q].reshape(B, H, q // group, group, D), bits, 3)
    ref_v = reference_quantize(values[:, :, :q].reshape(B, H, q, D // group, group), bits, 4)
    assert torch.allclose(out_k[:, :, :q], ref_k.reshape(B, H, q, D), atol=1e-5)
    assert torch.allclose(out_v[:, :, :q], ref_v.reshape(B, H, q, D), atol=1e-5)
    assert torch.equal(layer.positions, torch.arange(total, dtype=torch.int32).expand(B, H, total))


def test_each_token_is_quantized_once_and_never_changes_after() -> None:
    layer = QuantizedLayer(2, group=4, residual=3)
    snapshots: dict[int, torch.Tensor] = {}
    for step in range(40):
        k, v = kv(1, seed=step)
        layer.update(k, v)
        layer.release()
        out_k, _ = layer.keys_values()
        for slot in range(layer.quantized_length):
            pos = int(layer.positions[0, 0, slot])
            if pos in snapshots:
                assert torch.equal(snapshots[pos], out_k[:, :, slot]), (step, pos)
            snapshots[pos] = out_k[:, :, slot].clone()
    assert len(snapshots) == layer.quantized_length > 30


def test_quantization_waits_for_release_or_the_next_update() -> None:
    layer = QuantizedLayer(4, group=4, residual=2)
    keys, _ = feed(layer, [10], release=False)
    assert layer.quantized_length == 0  # the forward's attention may still select from full precision
    layer.release()
    assert layer.quantized_length == 8
    layer2 = QuantizedLayer(4, group=4, residual=2)
    feed(layer2, [10, 1], release=False)
    assert layer2.quantized_length == 8  # flushed when the next update came


@settings(max_examples=30, deadline=None)
@given(data=st.data(), bits=st.sampled_from([2, 4, 8]))
def test_keep_holds_exactly_the_kept_slots_per_row_and_head(data: st.DataObject, bits: int) -> None:
    layer = QuantizedLayer(bits, group=4, residual=3)
    feed(layer, [data.draw(st.integers(8, 20)), 1, 1])
    before_k, before_v = layer.keys_values()
    before_pos = layer.positions.clone()
    held = layer.physical_length
    n = data.draw(st.integers(1, held))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    indices = torch.stack([torch.stack([torch.randperm(held, generator=gen)[:n] for _ in range(H)])
                           for _ in range(B)])
    invalid = torch.rand(B, H, n, generator=gen) < 0.2
    old_bytes = layer.nbytes()
    order = layer.keep(indices, invalid)
    after_k, after_v = layer.keys_values()
    assert order.shape == (B, H, layer.physical_length) and layer.physical_length >= n
    idx = order[..., None].expand(-1, -1, -1, D)
    # every slot holding a token holds exactly what its old slot held (no re-quantization); the others
    # (fillers of shorter rows, slots declared invalid) are never attended
    pos = layer.positions
    real = (pos >= 0)[..., None]
    assert torch.equal(after_k * real, before_k.gather(2, idx) * real)
    assert torch.equal(after_v * real, before_v.gather(2, idx) * real)
    # positions: kept real tokens keep theirs, invalid ones and fillers are -1
    want = before_pos.clone().scatter_(2, indices, before_pos.gather(2, indices).masked_fill(invalid, -1))
    real_kept = (want.gather(2, indices) >= 0).sum(-1)
    assert torch.equal((pos >= 0).sum(-1), real_kept)
    assert bool(((pos == want.gather(2, order)) | (pos == -1)).all())
    assert layer.slots_remapped and layer.seen == before_pos.shape[2]
    if n < held // 2:
        assert layer.nbytes() < old_bytes
    # the store goes on: more tokens, flushes with per-slot groups
    feed(layer, [5, 1, 1], seed=50)
    assert layer.physical_length >= n + 7 - layer.group  # nothing real is lost
    assert int(layer.positions.max()) == layer.seen - 1


def test_keep_frees_key_groups_whose_tokens_all_left() -> None:
    layer = QuantizedLayer(4, group=4, residual=0)
    feed(layer, [16])
    assert layer._n_groups == 4
    keep = torch.tensor([0, 1, 12, 13]).expand(B, H, 4)  # groups 0 and 3 only
    layer.keep(keep)
    assert layer._n_groups == 2 and layer.quantized_length == 4
    assert layer._k_scale.shape[2] == 2


def test_index_batch_and_crop() -> None:
    layer = QuantizedLayer(4, group=4, residual=2)
    feed(layer, [11])
    k, v = layer.keys_values()
    layer.index_batch(torch.tensor([1, 1, 0]))
    k2, v2 = layer.keys_values()
    assert torch.equal(k2, k[[1, 1, 0]]) and torch.equal(v2, v[[1, 1, 0]]) and layer.batch_size == 3
    layer.crop(9)  # into the window
    assert layer.seen == 9 and torch.equal(layer.keys_values()[0], k2[:, :, :9])
    layer.crop(6)  # into the quantized region: the remaining quantized slots are untouched
    assert layer.seen == layer.physical_length == 6 and torch.equal(layer.keys_values()[0], k2[:, :, :6])
    k3, _ = kv(4, b=3, seed=9)
    out_k, _ = layer.update(k3, k3)
    assert torch.equal(out_k[:, :, :6], k2[:, :, :6]) and torch.equal(out_k[:, :, 6:], k3)
    with pytest.raises(KVCacheError, match="crop length"):
        layer.crop(99)


def test_errors_name_the_fix() -> None:
    with pytest.raises(KVCacheError, match="int8"):
        QuantizedLayer(2).update(torch.zeros(1, 1, 1, 6), torch.zeros(1, 1, 1, 6))
    layer = QuantizedLayer(4, capacity=8)
    layer.update(*kv(6))
    with pytest.raises(CacheCapacityError, match="capacity"):
        layer.update(*kv(3))
    with pytest.raises(KVCacheError, match="reset"):
        layer.update(*kv(1, b=3))
    with pytest.raises(KVCacheError, match="empty"):
        QuantizedLayer().keep(torch.zeros(1, 1, 1, dtype=torch.long))


def test_a_residual_window_longer_than_the_sequence_is_the_dense_store() -> None:
    q, d = QuantizedLayer(2, group=4, residual=100), DynamicLayer()
    for i in range(5):
        k, v = kv(7, seed=i)
        out_q, out_d = q.update(k, v), d.update(k, v)
        q.release()
        assert torch.equal(out_q[0], out_d[0]) and torch.equal(out_q[1], out_d[1])


# ----- memory --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "limit"), [(8, 0.55), (4, 0.30), (2, 0.20)])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_bytes_at_4096_tokens_against_the_dense_store(bits: int, limit: float, head_dim: int) -> None:
    shape = LayerShape(num_kv_heads=2, head_dim=head_dim, batch_size=1, dtype=torch.float32)
    dense = build_store(CacheSpec.parse("dynamic"), shape)
    quant = build_store(CacheSpec.parse(f"int{bits}"), shape)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 2, 4000, head_dim, generator=g)
    for store in (dense, quant):
        store.update(prompt, prompt)
        store.release()
        for _ in range(96):
            step = torch.randn(1, 2, 1, head_dim, generator=g)
            store.update(step, step)
            store.release()
    dense_bytes = estimate_store(CacheSpec.parse("dynamic"), shape, 4096).total
    assert quant.nbytes() <= limit * dense_bytes, quant.nbytes() / dense_bytes
    # the registry predicts it (up to the growth headroom of the quantized buffers)
    predicted = estimate_store(CacheSpec.parse(f"int{bits}"), shape, 4096).total
    assert predicted <= quant.nbytes() <= predicted * 1.04
    assert dense_bytes <= dense.nbytes() <= dense_bytes * 1.3


def test_padding_never_piles_up_in_a_padded_batch() -> None:
    """Rows of a left-padded batch send tokens to the quantized region at different steps; the slots that
    pad the shorter rows are squeezed out again, so the store stays as long as its fullest row (+ a group)."""
    layer = QuantizedLayer(4, group=8, residual=8)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(2, H, 40, D, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :30] = False  # row 1: 30 pads, 10 tokens
    layer.update(prompt, prompt, valid)
    layer.release()
    for _ in range(256):
        step = torch.randn(2, H, 1, D, generator=g)
        layer.update(step, step)
        layer.release()
    real = (layer.positions >= 0).sum(-1)
    assert int(real.max()) == 40 + 256 and int(real.min()) == 10 + 256
    assert layer.physical_length <= int(real.max()) + layer.group
    # each row holds each of its tokens exactly once
    for row in range(2):
        pos = layer.positions[row, 0]
        kept = pos[pos >= 0].sort().values
        assert torch.equal(kept, torch.arange(296 - kept.numel(), 296, dtype=kept.dtype))


def test_a_small_static_capacity_bounds_the_buffers() -> None:
    """int4+static:capacity=8 never allocates more slots than 8 (the window would be 192 otherwise)."""
    shape = LayerShape(num_kv_heads=2, head_dim=D, batch_size=1, max_cache_len=None)
    spec = CacheSpec.parse("static:capacity=8+int4")
    store = build_store(spec, shape)
    for i in range(8):
        k, v = kv(1, b=1, seed=i)
        store.update(k[:, :2], v[:, :2])
        store.release()
    dense_spec = CacheSpec.parse("static:capacity=8")
    dense = build_store(dense_spec, shape)
    assert store.nbytes() <= dense.nbytes() == estimate_store(dense_spec, shape, 8).total
    assert store.nbytes() == estimate_store(spec, shape, 8).total

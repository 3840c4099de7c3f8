"""Dense layer stores (dynamic, static): storage, lengths, eviction, batch re-indexing, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.errors import CacheCapacityError, KVCacheError
from kvcache.layers.dense import DynamicLayer, StaticLayer

B, H, D = 2, 3, 4


def kv(t: int, b: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, t, D, generator=g), torch.randn(b, H, t, D, generator=g)


def static(capacity: int = 16, b: int = B) -> StaticLayer:
    return StaticLayer(capacity, b, H, D, torch.float32, "cpu")


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.integers(1, 9), min_size=1, max_size=12), min_growth=st.integers(1, 8))
def test_dynamic_equals_concatenation(chunks: list[int], min_growth: int) -> None:
    layer = DynamicLayer(min_growth=min_growth)
    ref_k, ref_v = [], []
    for i, t in enumerate(chunks):
        k, v = kv(t, seed=i)
        ref_k.append(k)
        ref_v.append(v)
        out_k, out_v = layer.update(k, v)
        assert torch.equal(out_k, torch.cat(ref_k, 2))
        assert torch.equal(out_v, torch.cat(ref_v, 2))
        # the byte count follows every growth
        assert layer.nbytes() == B * H * layer.capacity * (2 * D * 4 + 4)
    total = sum(chunks)
    assert layer.seen == layer.physical_length == total
    assert layer.capacity >= total
    # slack is bounded: a quarter of the need plus min_growth
    assert layer.capacity <= total + max(min_growth, total // 4) + max(chunks)
    # keys and values (float32) plus one int32 logical position per slot and head
    assert layer.nbytes() == B * H * layer.capacity * (2 * D * 4 + 4)


def test_dynamic_decode_does_not_reallocate_every_step() -> None:
    layer = DynamicLayer(min_growth=8)
    layer.update(*kv(100))
    pointers = set()
    for i in range(64):
        layer.update(*kv(1, seed=i))
        pointers.add(layer.keys_values()[0].data_ptr())
    assert len(pointers) <= 3  # 64 steps with >= 25 % headroom per growth: a couple of re-allocations


def test_static_update_returns_whole_buffer_and_masks_nothing_itself() -> None:
    layer = static(10)
    k, v = kv(4)
    out_k, out_v = layer.update(k, v)
    assert out_k.shape == (B, H, 10, D)
    assert torch.equal(out_k[:, :, :4], k) and torch.equal(out_v[:, :, :4], v)
    assert layer.physical_length == layer.seen == 4
    held_k, _ = layer.keys_values()
    assert held_k.shape == (B, H, 4, D)
    k2, v2 = kv(1, seed=1)
    out_k, _ = layer.update(k2, v2)
    assert torch.equal(out_k[:, :, 4:5], k2)
    assert layer.nbytes() == B * H * 10 * (2 * D * 4 + 4)  # preallocated K/V + positions, whatever is held


def test_static_overflow_raises_before_writing() -> None:
    layer = static(6)
    layer.update(*kv(5))
    before = layer._keys.clone()
    with pytest.raises(CacheCapacityError) as err:
        layer.update(*kv(2, seed=3))
    msg = str(err.value)
    for needle in ("capacity is 6", "5 are held", "2 more", "static:capacity=", "dynamic"):
        assert needle in msg
    assert torch.equal(layer._keys, before)
    assert layer.seen == layer.physical_length == 5
    layer.update(*kv(1, seed=4))  # the one slot left still works
    assert layer.physical_length == 6


def test_static_keeps_buffer_address_across_steps_and_beam_reorder() -> None:
    layer = static(12)
    ptr = layer._keys.data_ptr()
    layer.update(*kv(3))
    for i in range(4):
        layer.update(*kv(1, seed=i + 1))
    layer.reorder(torch.tensor([1, 0]))
    assert layer._keys.data_ptr() == ptr


def test_static_reallocates_only_when_empty() -> None:
    layer = static(8, b=1)
    k, v = kv(3, b=3)  # beam search expands the batch before the first update
    layer.update(k, v)
    assert layer.batch_size == 3
    with pytest.raises(KVCacheError, match="reset"):
        layer.update(*kv(1, b=1))
    layer.reset()
    layer.update(*kv(2, b=1))
    assert layer.batch_size == 1 and layer.seen == 2


@pytest.mark.parametrize("make", [DynamicLayer, static])
def test_keep_is_per_sequence_and_head_and_leaves_seen(make) -> None:
    layer = make()
    k, v = kv(6)
    layer.update(k, v)
    idx = torch.stack([torch.stack([torch.randperm(6)[:3] for _ in range(H)]) for _ in range(B)])
    layer.keep(idx)
    assert layer.seen == 6 and layer.physical_length == 3
    held_k, held_v = layer.keys_values()
    order = idx.sort(-1).values
    for b in range(B):
        for h in range(H):
            assert torch.equal(held_k[b, h], k[b, h, order[b, h]])
            assert torch.equal(held_v[b, h], v[b, h, order[b, h]])
    # new tokens land after the kept ones; the logical length keeps counting
    k2, v2 = kv(2, seed=9)
    out_k, _ = layer.update(k2, v2)
    assert torch.equal(out_k[:, :, 3:5], k2)
    assert layer.seen == 8 and layer.physical_length == 5
    with pytest.raises(KVCacheError, match="before any eviction"):
        layer.crop(2)


@pytest.mark.parametrize("make", [DynamicLayer, static])
def test_index_batch_repeat_and_crop(make) -> None:
    layer = make()
    k, v = kv(5)
    layer.update(k, v)
    layer.repeat_interleave(2)
    held_k, _ = layer.keys_values()
    assert torch.equal(held_k, k.repeat_interleave(2, dim=0))
    layer.index_batch(torch.tensor([3, 0]))
    held_k, held_v = layer.keys_values()
    assert torch.equal(held_k, k[[1, 0]]) and torch.equal(held_v, v[[1, 0]])
    layer.crop(2)
    assert layer.seen == layer.physical_length == 2
    k2, v2 = kv(1, seed=5)
    out_k, _ = layer.update(k2, v2)
    assert torch.equal(out_k[:, :, :2], k[[1, 0], :, :2]) and torch.equal(out_k[:, :, 2:3], k2)
    with pytest.raises(KVCacheError, match="crop length"):
        layer.crop(7)


@pytest.mark.parametrize("make", [DynamicLayer, static])
def test_reset_and_bad_input(make) -> None:
    layer = make()
    layer.update(*kv(3))
    layer.reset()
    assert layer.seen == 0 and layer.physical_length == 0 and layer.keys_values() is None
    with pytest.raises(KVCacheError, match=r"\(B, H_kv, T, D\)"):
        layer.update(torch.zeros(B, H, 2), torch.zeros(B, H, 2))
    with pytest.raises(KVCacheError, match="n_keep"):
        layer.update(*kv(2))
        layer.keep(torch.zeros(B, 2, dtype=torch.long))


def test_static_rejects_bad_shape_arguments() -> None:
    with pytest.raises(KVCacheError, match="capacity"):
        StaticLayer(0, 1, H, D)


def test_dynamic_adopt_equals_update_without_copying():
    """adopt(): the store keeps a runtime's past ++ new tensor as its buffer (no copy), and is then the same
    store update() would have made (keys, values, positions, padding, a later update growing it)."""
    torch.manual_seed(0)
    first_k, first_v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    ref, ours = DynamicLayer(), DynamicLayer()
    ref.update(first_k, first_v, valid)
    ours.adopt(first_k.clone(), first_v.clone(), valid)
    new_k, new_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    ref.update(new_k, new_v)
    present_k = torch.cat([ours.keys_values()[0], new_k], dim=2)
    ours.adopt(present_k, torch.cat([ours.keys_values()[1], new_v], dim=2))
    assert ours.keys_values()[0].data_ptr() == present_k.data_ptr()  # held, not copied
    for a, b in zip(ref.keys_values(), ours.keys_values(), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(ref.positions, ours.positions) and ours.seen == ref.seen == 4
    more_k, more_v = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    ref.update(more_k, more_v)
    ours.update(more_k, more_v)
    torch.testing.assert_close(ref.keys_values()[1], ours.keys_values()[1])
    assert torch.equal(ref.positions, ours.positions)
    with pytest.raises(KVCacheError, match="held slots"):
        ours.adopt(torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4))


def test_replaced_buffers_are_freed_and_counted_no_more() -> None:
    """The store holds no replaced buffer alive: after a growth the old one is freed, and the byte count
    follows the new one; after a reset it is 0."""
    import gc
    import weakref

    layer = DynamicLayer(min_growth=4)
    layer.update(*kv(4))
    old = weakref.ref(layer._keys)  # the whole buffer (keys_values() returns a view of it)
    small = layer.nbytes()
    layer.update(*kv(64))
    gc.collect()
    assert old() is None  # freed before the count is asked
    assert layer.nbytes() > small
    layer.reset()
    assert layer.nbytes() == 0

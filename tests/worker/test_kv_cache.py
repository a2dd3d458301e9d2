"""The paged KV cache's token-range arithmetic: slot ids, and reading and writing a range of a
layer, on a tiny pool (block size 4, 6 blocks, 2 layers, 2 K/V heads of 3 dims)."""

from __future__ import annotations

import pytest
import torch

from kvserve.worker.kv_cache import PagedKVCache

BLOCK_SIZE, NUM_BLOCKS, NUM_LAYERS, KV_HEADS, HEAD_DIM = 4, 6, 2, 2, 3


def make_cache(dtype: torch.dtype = torch.float32) -> PagedKVCache:
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    layers = [
        (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        for _ in range(NUM_LAYERS)
    ]
    return PagedKVCache(layers=layers, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)


def kv(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    return keys, torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen)


def test_slots_follow_the_block_table() -> None:
    cache = make_cache()
    table = [5, 2, 0]
    assert cache.slots(table, 0, 12).tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 0, 1, 2, 3]
    # Mid-block start and end: positions 3..6 are block 5 slot 3, then block 2 slots 0..2.
    slots = cache.slots(table, 3, 7)
    assert slots.tolist() == [23, 8, 9, 10]
    assert slots.dtype == torch.int64
    assert slots.device == cache.device == torch.device("cpu")
    assert cache.slots(table, 9, 9).tolist() == []


def test_write_then_read_round_trips_across_a_block_boundary() -> None:
    cache = make_cache()
    table = [4, 1, 3]
    keys, values = kv(6, seed=0)
    cache.write(1, table, 2, keys, values)  # positions 2..7: block 4 slots 2-3, block 1 slots 0-3
    read_keys, read_values = cache.read(1, table, 2, 8)
    assert torch.equal(read_keys, keys)
    assert torch.equal(read_values, values)
    k_cache, v_cache = cache.layers[1]
    assert torch.equal(k_cache[4, 2:], keys[:2])
    assert torch.equal(k_cache[1], keys[2:])
    assert torch.equal(v_cache[1], values[2:])
    assert k_cache[4, :2].eq(0).all() and k_cache[3].eq(0).all()  # untouched slots
    assert cache.layers[0][0].eq(0).all()  # untouched layer


def test_a_write_starting_mid_block_leaves_the_earlier_positions() -> None:
    cache = make_cache()
    table = [0, 5]
    first_keys, first_values = kv(3, seed=1)
    cache.write(0, table, 0, first_keys, first_values)
    more_keys, more_values = kv(4, seed=2)
    cache.write(0, table, 3, more_keys, more_values)  # block 0 slot 3, block 5 slots 0-2
    keys, values = cache.read(0, table, 0, 7)
    assert torch.equal(keys, torch.cat([first_keys, more_keys]))
    assert torch.equal(values, torch.cat([first_values, more_values]))


def test_read_returns_copies() -> None:
    cache = make_cache()
    keys, _ = cache.read(0, [2], 0, 4)
    keys.fill_(7.0)
    assert cache.layers[0][0].eq(0).all()


def test_write_converts_to_the_cache_dtype() -> None:
    cache = make_cache(torch.bfloat16)
    keys, values = kv(5, seed=3)  # float32 in
    cache.write(0, [1, 2], 1, keys, values)
    read_keys, read_values = cache.read(0, [1, 2], 1, 6)
    assert read_keys.dtype == torch.bfloat16
    assert torch.equal(read_keys, keys.to(torch.bfloat16))
    assert torch.equal(read_values, values.to(torch.bfloat16))


def test_a_range_beyond_the_block_table_is_refused() -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match=r"token range 6\.\.9 is beyond the block table: 2 blocks"):
        cache.slots([0, 1], 6, 9)
    with pytest.raises(ValueError, match="beyond the block table"):
        cache.read(0, [0, 1], 0, 9)
    keys, values = kv(3, seed=4)
    with pytest.raises(ValueError, match=r"token range 6\.\.9 is beyond the block table"):
        cache.write(0, [0, 1], 6, keys, values)
    assert cache.layers[0][0].eq(0).all()  # nothing written


def test_bad_ranges_layers_blocks_and_shapes_are_refused() -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="not 0 <= start <= end"):
        cache.slots([0], 3, 2)
    with pytest.raises(ValueError, match="not 0 <= start <= end"):
        cache.slots([0], -1, 2)
    with pytest.raises(ValueError, match="outside the pool of 6"):
        cache.slots([0, NUM_BLOCKS], 0, 8)
    with pytest.raises(ValueError, match=r"layer 2 is not in 0\.\.1"):
        cache.read(NUM_LAYERS, [0], 0, 1)
    keys, values = kv(2, seed=5)
    with pytest.raises(ValueError, match="must both have shape"):
        cache.write(0, [0], 0, keys, values[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_slots_and_reads_live_on_the_cache_device_and_writes_move_there() -> None:
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    device = torch.device("cuda")
    layers = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device))]
    cache = PagedKVCache(layers=layers, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    assert cache.device.type == "cuda"
    assert cache.slots([3, 1], 2, 6).device.type == "cuda"
    keys, values = kv(4, seed=6)  # on the CPU
    cache.write(0, [3, 1], 2, keys, values)
    read_keys, read_values = cache.read(0, [3, 1], 2, 6)
    assert read_keys.device.type == "cuda"
    assert torch.equal(read_keys.cpu(), keys) and torch.equal(read_values.cpu(), values)

"""Chained block keys: a block's digest depends on everything before it and its extra keys."""

from __future__ import annotations

from kvserve.core.block_hash import BlockKey, extend_block_keys


def keys_of(token_ids: list[int], block_size: int = 4, extra: tuple[str, ...] = ()) -> list:
    keys: list[BlockKey] = []
    extend_block_keys(keys, token_ids, block_size, extra)
    return keys


def test_only_full_blocks_get_keys_and_each_chains_to_its_parent() -> None:
    keys = keys_of(list(range(11)))
    assert [k.token_ids for k in keys] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert keys[0].parent is None and keys[1].parent == keys[0].digest


def test_same_block_after_a_different_prefix_has_a_different_digest() -> None:
    a = keys_of([1, 2, 3, 4, 9, 9, 9, 9])
    b = keys_of([5, 6, 7, 8, 9, 9, 9, 9])
    assert a[1].token_ids == b[1].token_ids
    assert a[1].digest != b[1].digest
    assert keys_of([1, 2, 3, 4, 9, 9, 9, 9])[1].digest == a[1].digest  # deterministic


def test_extra_keys_separate_otherwise_equal_prefixes() -> None:
    plain = keys_of([1, 2, 3, 4, 5, 6, 7, 8])
    salted = keys_of([1, 2, 3, 4, 5, 6, 7, 8], extra=("tenant-a",))
    assert plain[0].digest != salted[0].digest and plain[1].digest != salted[1].digest
    assert salted[1].extra_keys == ()  # reaches later blocks through the chain only
    # The encoding is unambiguous: ("ab",) and ("a", "b") differ.
    assert keys_of([1] * 4, extra=("ab",))[0].digest != keys_of([1] * 4, extra=("a", "b"))[0].digest


def test_extending_continues_from_the_known_keys() -> None:
    tokens = list(range(20))
    keys = keys_of(tokens[:9])
    extend_block_keys(keys, tokens, 4)
    assert keys == keys_of(tokens)

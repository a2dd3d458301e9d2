"""Chained hashes that name a full KV block by everything before and in it.

A block's hash covers its parent block's hash, its own token ids and extra keys (a cache salt,
an adapter name): two blocks share a hash only when the whole prefix up to their end matches,
so a prefix-cache lookup is a walk down the chain that stops at the first miss.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import xxhash

BlockHash = int


@dataclass(frozen=True)
class BlockKey:
    """What a cached block holds; compared on every hit, so a hash collision is never a hit."""

    parent: BlockHash | None
    token_ids: tuple[int, ...]
    extra_keys: tuple[str, ...] = ()

    @cached_property
    def digest(self) -> BlockHash:
        """128-bit xxh3 of the parent digest, the token ids and the extra keys."""
        digest = xxhash.xxh3_128()
        digest.update(b"root" if self.parent is None else self.parent.to_bytes(16, "little"))
        digest.update(array("q", self.token_ids).tobytes())
        for key in self.extra_keys:
            encoded = key.encode()
            digest.update(len(encoded).to_bytes(4, "little") + encoded)
        return digest.intdigest()


def extend_block_keys(
    keys: list[BlockKey],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[str, ...] = (),
) -> None:
    """Append the keys of the full blocks of ``token_ids`` that ``keys`` does not cover yet.

    Extra keys go into the first block only; through the chain they reach every later block.
    """
    for index in range(len(keys), len(token_ids) // block_size):
        start = index * block_size
        keys.append(
            BlockKey(
                parent=keys[-1].digest if keys else None,
                token_ids=tuple(token_ids[start : start + block_size]),
                extra_keys=extra_keys if index == 0 else (),
            )
        )

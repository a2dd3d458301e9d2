"""Row buckets of CPU bfloat16 linears: a bounded set of row counts, little padding, and the
same output rows as the unpadded matmul."""

from __future__ import annotations

import pytest
import torch

from kvserve.model.row_buckets import EXACT_ROWS, bucketed_linear, padded_rows


def test_row_counts_are_bounded_and_padding_is_at_most_a_sixteenth() -> None:
    counts = [padded_rows(n) for n in range(1, 8193)]
    assert counts[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    assert all(p >= n and (p - n) * 16 <= n for n, p in enumerate(counts, start=1))
    assert counts == sorted(counts)
    assert len(set(counts)) == 160
    assert padded_rows(257) == 272 and padded_rows(1000) == 1024 and padded_rows(1024) == 1024


@pytest.mark.parametrize("num_rows", [1, 16, 17, 100, 257, 1000])
def test_bucketed_linear_gives_the_rows_of_the_plain_linear(num_rows: int) -> None:
    torch.manual_seed(num_rows)
    weight = torch.randn(96, 64).bfloat16()
    bias = torch.randn(96).bfloat16()
    x = torch.randn(num_rows, 64).bfloat16()
    out = bucketed_linear(x, weight, bias)
    assert out.shape == (num_rows, 96)
    # the same rows through another row count may differ in the last bit where the kernel
    # blocks differently; on the AVX-512/AMX Xeon here they are equal
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias),
                               rtol=1e-2, atol=1e-2)
    x32 = x.float()  # float32 is never padded
    assert torch.equal(bucketed_linear(x32, weight.float()), x32 @ weight.float().T)

"""CUDA graphs of small prefill steps: the padded inputs exactly (anywhere), and on a GPU, a
replayed step of decodes, a chunk and a prefix-cache hit's suffix gives the eager forward's
hidden states and K/V."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kvserve.worker.prefill_graphs import prefill_inputs


def test_inputs_of_a_mixed_step_padded_to_its_bucket() -> None:
    # a decode at position 5 (block 7), a 3-token chunk from position 14: blocks 9, then 4
    inputs = prefill_inputs([[11], [21, 22, 23]], [5, 14], [[7], [2, 9, 4]], block_size=8,
                            size=8, max_reqs=3, num_tiles=3)
    assert inputs.tokens.tolist() == [
        [11, 21, 22, 23, 0, 0, 0, 0],
        [5, 14, 15, 16, 0, 0, 0, 0],
        [7 * 8 + 5, 9 * 8 + 6, 9 * 8 + 7, 4 * 8 + 0, -1, -1, -1, -1],
    ]
    assert inputs.query_start_loc.tolist() == [0, 1, 4, 4, 4]  # requests 2 and 3 are empty
    assert inputs.seq_lens.tolist() == [6, 17, 0, 0]
    assert inputs.block_tables.tolist() == [[7, 0, 0], [2, 9, 4]]
    assert inputs.tiles.tolist() == [[0, 1, 3], [0, 0, 0]]  # the last tile: padding request 3


def test_a_long_request_takes_one_tile_per_64_queries() -> None:
    inputs = prefill_inputs([list(range(130))], [0], [list(range(9))], block_size=16, size=256,
                            max_reqs=2, num_tiles=6)
    assert inputs.tiles.tolist() == [[0, 0, 0, 2, 2, 2], [0, 64, 128, 0, 0, 0]]
    assert inputs.tokens[2, 129] == 8 * 16 + 1 and inputs.tokens[2, 130] == -1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_prefill_step_equals_eager_forward() -> None:
    from kvserve.attention.backend import create_backend
    from kvserve.attention.metadata import build_attention_metadata
    from kvserve.model.config import ModelConfig
    from kvserve.model.dummy_loader import dummy_weights
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.worker.kv_cache import allocate_kv_cache, kv_bytes_per_block
    from kvserve.worker.prefill_graphs import PrefillGraphs

    config = ModelConfig("qwen3", vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, qk_norm=True, tie_word_embeddings=True,
                         max_position_embeddings=1024)
    device = torch.device("cuda")
    model = LlamaForCausalLM.from_weights(
        config, dummy_weights(config), torch.float32, device, fused_ops=True
    )
    block_size, num_blocks = 16, 64

    def new_cache():
        return allocate_kv_cache(config, num_blocks * kv_bytes_per_block(
            config, block_size, torch.float32), block_size, torch.float32, device)

    graph_cache, eager_cache = new_cache(), new_cache()
    backend = create_backend("triton")
    graphs = PrefillGraphs(model, graph_cache.layers, backend, block_size, max_reqs=8,
                           max_model_len=512, device=device, sizes=(16, 64, 128))
    graphs.capture()
    rng = random.Random(0)
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (context before the step, tokens this step): two decodes, a 70-token chunk from
    # position 30 (two tiles, mid-block), a prefix hit's 9-token suffix after 32 cached tokens
    shapes = [(16, 1), (40, 1), (30, 70), (32, 9)]
    tables = [[free.pop() for _ in range(-(-(c + n) // block_size))] for c, n in shapes]
    with torch.inference_mode():
        for (k, v), (k2, v2) in zip(graph_cache.layers, eager_cache.layers, strict=True):
            k.normal_()
            v.normal_()
            k2.copy_(k)
            v2.copy_(v)
        ids = [[rng.randrange(config.vocab_size) for _ in range(n)] for _, n in shapes]
        replayed = graphs.run(ids, [c for c, _ in shapes], tables).clone()
        metadata = build_attention_metadata([n for _, n in shapes], [c + n for c, n in shapes],
                                            tables, block_size, device)
        flat = torch.tensor([t for row in ids for t in row], device=device)
        positions = torch.tensor(
            [p for c, n in shapes for p in range(c, c + n)], device=device)
        eager = model(flat, positions, eager_cache.layers, metadata, backend)
    assert replayed.shape == (81, config.hidden_size)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    for (k, v), (k2, v2) in zip(graph_cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close(k, k2)  # the same slots written, padding rows none
        torch.testing.assert_close(v, v2)
    assert np.isfinite(replayed.cpu().numpy()).all()


class FakeGraph:
    """Stands in for a captured graph on CPU: records which bucket was replayed."""

    def __init__(self, replayed: list[int], size: int) -> None:
        self.replayed, self.size = replayed, size

    def replay(self) -> None:
        self.replayed.append(self.size)


def test_run_fills_the_smallest_bucket_that_holds_the_step() -> None:
    """Every bucket's buffers take the step (the smaller ones have fewer tiles than the
    largest), padding included; the replay is the bucket's."""
    from kvserve.worker.prefill_graphs import PrefillGraphs

    graphs = PrefillGraphs(None, [], None, block_size=4, max_reqs=3, max_model_len=128,
                           device=torch.device("cpu"), sizes=(8, 64, 128))
    replayed: list[int] = []
    for size in graphs.sizes:
        graphs._graphs[size] = FakeGraph(replayed, size)
        graphs._outputs[size] = torch.arange(size * 2).reshape(size, 2)
    hidden = graphs.run([[5, 6, 7], [9]], [0, 4], [[3], [1, 2]])
    assert replayed == [8] and hidden.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert graphs._tokens[:, :8].tolist() == [
        [5, 6, 7, 9, 0, 0, 0, 0], [0, 1, 2, 4, 0, 0, 0, 0], [12, 13, 14, 8, -1, -1, -1, -1]]
    assert graphs._tiles[:, :3].tolist() == [[0, 1, 3], [0, 0, 0]]
    assert graphs._seq_lens.tolist() == [3, 5, 0, 0]
    graphs.run([list(range(70))], [0], [list(range(18))])
    assert replayed == [8, 128] and graphs._tiles[:, :5].tolist() == [[0, 0, 3, 3, 3],
                                                                       [0, 64, 0, 0, 0]]
    with pytest.raises(ValueError, match="at most 128 tokens of 3"):
        graphs.run([[1]] * 4, [0] * 4, [[0]] * 4)

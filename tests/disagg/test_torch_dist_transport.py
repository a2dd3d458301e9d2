"""The torch.distributed transport between real processes (gloo on 127.0.0.1): chunks arrive
intact, and a prefill engine in one process hands requests to a decode engine in another with
the same greedy tokens as one colocated engine."""

from __future__ import annotations

import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvserve.disagg.torch_dist_transport import decode_header, encode_header
from kvserve.disagg.transfer import KVChunk

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank
    )


def chunk_for(index: int) -> KVChunk:
    gen = torch.Generator().manual_seed(index)
    n = 3 + index
    return KVChunk(f"request-{index % 2}", index, 10 * index, 10 * index + n,
                   torch.randn(n, 2, 8, generator=gen), torch.randn(n, 2, 8, generator=gen))


def chunks_worker(rank: int, port: int, results) -> None:
    from kvserve.disagg.torch_dist_transport import TorchDistReceiver, TorchDistSender

    try:
        init(rank, port)
        if rank == 0:
            sender = TorchDistSender(dst=1)
            for index in range(4):
                sender.send(chunk_for(index))
            sender.flush()
            sender.close(stop_receiver=True)
        else:
            received: list[KVChunk] = []
            receiver = TorchDistReceiver(received.append, 2, 8, torch.float32)
            receiver.join(TIMEOUT_S)
            # numpy arrays travel by value: a tensor would travel as a shared-memory handle
            # that disappears when this process exits before the parent reads it.
            results.put([(c.transfer_id, c.layer, c.start, c.end, c.keys.numpy(),
                          c.values.numpy()) for c in received])
        dist.destroy_process_group()
    except BaseException:
        results.put(traceback.format_exc())


def test_header_round_trip() -> None:
    assert decode_header(encode_header(5, 16, 40, "abc-123")) == (5, 16, 40, "abc-123")
    with pytest.raises(ValueError, match="longer than 64 bytes"):
        encode_header(0, 0, 1, "x" * 65)


def test_chunks_arrive_intact_between_processes() -> None:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=chunks_worker, args=(rank, port, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    got = results.get(timeout=TIMEOUT_S)
    for proc in procs:
        proc.join(TIMEOUT_S)
    assert not isinstance(got, str), got
    assert len(got) == 4
    for index, (transfer_id, layer, start, end, keys, values) in enumerate(got):
        expected = chunk_for(index)
        assert (transfer_id, layer, start, end) == (
            expected.transfer_id, expected.layer, expected.start, expected.end)
        assert torch.equal(torch.from_numpy(keys), expected.keys)
        assert torch.equal(torch.from_numpy(values), expected.values)


PROMPTS = [[100 + 37 * i % 900 for i in range(n)] for n in (9, 33, 70)]
PARAMS = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


def engines_worker(rank: int, port: int, plans, tokens, results) -> None:
    """Rank 0 prefills and sends; rank 1 reserves, receives and decodes (each through its
    engine's named KV operations, as a server's engine process runs them)."""
    from kvserve.disagg.connector import KVLoader, KVSaver
    from kvserve.disagg.core_ops import DecodeOps, PrefillOps
    from kvserve.disagg.pair import run_op
    from kvserve.disagg.torch_dist_transport import TorchDistReceiver, TorchDistSender
    from kvserve.engine.llm import LLM
    from kvserve.engine.messages import AdmitWithKV, PrefillAndSend, ReserveKV
    from kvserve.sampling_params import SamplingParams

    try:
        init(rank, port)
        options = dict(dtype="float32", quantization="none", enforce_eager=True,
                       kv_cache_memory="64MiB", max_num_seqs=4)
        if rank == 0:
            sender = TorchDistSender(dst=1)
            saver = KVSaver(sender)
            llm = LLM(kv_connector=saver, **options)
            ops = PrefillOps(llm.engine.core, saver, lambda rank: sender)
            for prompt in PROMPTS:
                transfer_id, num_tokens, skip_tokens = plans.get(timeout=TIMEOUT_S)
                op = PrefillAndSend(prompt, SamplingParams(**PARAMS), transfer_id, num_tokens,
                                    skip_tokens, kv_rank=1)
                tokens.put(run_op(ops, op, wait=llm.engine.step).first_token)
            sender.close(stop_receiver=True)
            results.put(("prefill", sender.sent_bytes))
        else:
            llm = LLM(**options)
            engine = llm.engine
            loader = KVLoader(engine.core)
            ops = DecodeOps(engine.core, loader)
            k_cache = engine.runner.kv_cache.layers[0][0]
            receiver = TorchDistReceiver(loader.deliver, k_cache.shape[2], k_cache.shape[3],
                                         k_cache.dtype)
            outputs = []
            for prompt in PROMPTS:
                params = SamplingParams(**PARAMS)
                plan = run_op(ops, ReserveKV(prompt, params))
                plans.put((plan.transfer_id, plan.num_tokens, plan.skip_tokens))
                first = tokens.get(timeout=TIMEOUT_S)
                outputs.append(engine.track(plan.transfer_id, None, prompt, params))
                run_op(ops, AdmitWithKV(plan.transfer_id, first))  # waits for every layer
            while engine.has_unfinished:
                engine.step()
            receiver.join(TIMEOUT_S)
            results.put(("decode", [o.token_ids for o in outputs]))
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", traceback.format_exc()))


def test_prefill_and_decode_engines_in_two_processes_match_colocated() -> None:
    from kvserve.engine.llm import LLM
    from kvserve.sampling_params import SamplingParams

    context = mp.get_context("spawn")
    plans, tokens, results = context.Queue(), context.Queue(), context.Queue()
    port = free_port()
    procs = [context.Process(target=engines_worker, args=(rank, port, plans, tokens, results))
             for rank in (0, 1)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=TIMEOUT_S) for _ in procs)
    for proc in procs:
        proc.join(TIMEOUT_S)
    assert "error" not in got, got.get("error")
    colocated = LLM(dtype="float32", quantization="none", enforce_eager=True,
                    kv_cache_memory="64MiB", max_num_seqs=4)
    expected = colocated.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    assert got["decode"] == [o.token_ids for o in expected]
    assert got["prefill"] > 0

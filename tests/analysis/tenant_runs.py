"""Traced runs of a real engine with a tenant config, for the trace and analyze tests: a tiny
Llama with dummy weights (vocabulary 256, 2 layers), blocks of 4 tokens, driven through
EngineCore so each request is added with its tenant."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kvserve import LLM, SamplingParams
from kvserve.core.tenants import TenantConfig

TINY_LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256}
BLOCK_SIZE = 4
TENANTS = TenantConfig.from_mapping({"tenants": {
    "A": {"kv_quota": 0.5}, "B": {"isolate_prefix_cache": True}, "C": {"weight": 2},
}})


@dataclass(frozen=True)
class Sent:
    """A request of a run: its tenant as sent, and its lengths."""

    tenant: str | None
    prompt: list[int]
    max_tokens: int


def tiny_engine(tmp_path: Path, trace: Path, tenants: TenantConfig | None,
                max_num_seqs: int = 4) -> LLM:
    config = tmp_path / "tiny_llama.json"
    config.write_text(json.dumps(TINY_LLAMA))
    return LLM(str(config), load_format="dummy", dtype="float32", enforce_eager=True,
               block_size=BLOCK_SIZE, kv_cache_memory="256KiB", max_num_seqs=max_num_seqs,
               trace_file=str(trace), tenant_config=tenants)


def mixed_requests(seed: int = 0) -> list[Sent]:
    """Three requests of each configured tenant, one of an unknown name (``other``) and one
    of none (``default``); prompts of 5 to 30 random ids, so no two share a block."""
    rng = random.Random(seed)
    tenants = ["A", "B", "C"] * 3 + ["someone-else", None]
    return [Sent(tenant, [rng.randrange(1, 256) for _ in range(rng.randrange(5, 31))],
                 rng.randrange(3, 21)) for tenant in tenants]


def run_all(llm: LLM, sent: list[Sent], steps_between: int = 0) -> None:
    """Add the requests (``steps_between`` engine steps after each), step until every one
    has finished, and close the trace."""
    core = llm.engine.core
    for request in sent:
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
        core.add_request(core.new_request(request.prompt, params, tenant=request.tenant))
        for _ in range(steps_between):
            core.step()
    while core.has_work:
        core.step()
    assert core.trace is not None
    core.trace.close()


def read_lines(path: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return ([x for x in lines if x["type"] == "step"],
            [x for x in lines if x["type"] == "request"])

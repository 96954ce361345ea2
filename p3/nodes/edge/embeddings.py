"""POST /v1/embeddings: OpenAI's body (input as a string, strings, token ids or lists of
them; encoding_format float or base64; dimensions), one embedding sample per input, routed
and failed over like any generation (an embedding has no tokens to lose: a moved one starts
again), each node's answer the last token's final hidden state, L2-normalized (vLLM's embed
pooling for a decoder model). `dimensions` keeps the first d values and normalizes again.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import TYPE_CHECKING, Any

from p3.nodes.cluster.generation import Generation, RequestFailed
from p3.nodes.cluster.samples import make_samples
from p3.nodes.edge.bodies import failure_error
from p3.nodes.edge.errors import ApiError, bad_request
from p3.nodes.edge.prompts import refuse_text
from p3.nodes.edge.responses import new_id
from p3.nodes.edge.schemas import Fields
from p3.sampling_params import SamplingParams

if TYPE_CHECKING:
    from p3.nodes.edge.edge import Edge

MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs


async def embeddings(edge: Edge, body: Any) -> dict[str, Any]:
    f = Fields(body)
    inputs = _inputs(body.get("input") if isinstance(body, dict) else None)
    encoding = f.str("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("encoding_format", "encoding_format must be 'float' or 'base64'")
    dimensions = f.int("dimensions", None, 1, 1 << 20)
    model, tokenizer = await edge.model_for(body)
    lora = edge.adapter_of(body["model"])
    if not edge.cluster.replicas(model, lora):
        raise ApiError(503, f"no ready replica of model {body['model']!r}", code="no_replica")
    if any(isinstance(i, str) for i in inputs):
        refuse_text(tokenizer, "input", "a text input needs one; give token ids instead")
    prompts = [tokenizer.encode(i) if isinstance(i, str) else i for i in inputs]
    _check_context(edge, model, prompts, tokenizer.vocab_size)
    params = SamplingParams(max_tokens=1)
    samples = make_samples(new_id("embd"), model, prompts, params, tokenizer, lora)
    for sample in samples:
        sample.journal.embed = True
    generation = Generation(edge.cluster, samples, edge.config.token_timeout_s)
    try:
        await generation.start()
        async for _ in generation.stream():
            pass
    except RequestFailed as failure:
        raise failure_error(failure) from None
    width = len(samples[0].embedding or [])
    if dimensions is not None and dimensions > width:
        raise bad_request("dimensions", f"dimensions must be at most {width} for this model")
    data = [
        {
            "object": "embedding",
            "index": s.index,
            "embedding": _encode(s.embedding, dimensions, encoding),
        }
        for s in samples
    ]
    num_tokens = sum(map(len, prompts))
    return {
        "object": "list",
        "data": data,
        "model": edge.models.api_name(model),
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }


def _inputs(value: Any) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if value is None:
        raise bad_request("input", "input is required", "missing_required_parameter")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise bad_request("input", "input must be a string, strings, token ids or token-id lists")
    if all(_is_token(t) for t in value):
        value = [value]
    if len(value) > MAX_INPUTS:
        raise bad_request("input", f"input allows at most {MAX_INPUTS} items")
    for item in value:
        text_ok = isinstance(item, str) and item != ""
        ids_ok = isinstance(item, list) and item and all(map(_is_token, item))
        if not (text_ok or ids_ok):
            raise bad_request(
                "input", "each input must be a non-empty string or a non-empty list of token ids"
            )
    return value


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31


def _check_context(edge: Edge, model: str, prompts: list[list[int]], vocab: int | None) -> None:
    max_len = edge.max_model_len(model)
    for ids in prompts:
        if vocab is not None and any(t >= vocab for t in ids):  # None: the node checks them
            raise bad_request("input", f"input token ids must be below {vocab}")
        if not ids or len(ids) >= max_len:
            raise bad_request(
                "input",
                f"an input has {len(ids)} tokens; this model's context is {max_len}",
                "context_length_exceeded",
            )


def _encode(vector: list[float] | None, dimensions: int | None, encoding: str) -> Any:
    values = list(vector or [])
    if dimensions is not None:
        values = values[:dimensions]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        values = [v / norm for v in values]
    if encoding == "base64":  # little-endian float32, as OpenAI's (and numpy's frombuffer)
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values

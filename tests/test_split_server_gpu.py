"""The split server on a GPU: micro-batched answers equal one-at-a-time answers."""

import copy

import pytest
import torch

from aggregator.split_server import SplitRequest, SplitServer
from models.split import DecoderSpec, add_lora, causal_lm_labels, load_full_model, split_model

pytestmark = pytest.mark.gpu


def test_micro_batched_gradients_equal_one_at_a_time_on_cuda():
    assert torch.cuda.is_available(), "this test needs a CUDA GPU (run it with -m gpu on a GPU machine)"
    spec = DecoderSpec(n_layer=4, n_embd=128, n_head=4, cut=2)
    _, tail = split_model(load_full_model(spec), spec.cut)
    tail = add_lora(tail, ["c_attn"])
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i, t in enumerate((32, 32, 48, 64)):  # different lengths: padded and masked in the micro-batch
        ids = torch.randint(0, 50257, (2, t), generator=g)
        mask = torch.ones(2, t, dtype=torch.long)
        reqs.append(SplitRequest(f"a{i}", 0, torch.randn(2, t, 128, generator=g), mask, causal_lm_labels(ids, mask)))
    together = SplitServer(copy.deepcopy(tail), lr=0.0, device="cuda").serve(reqs)
    alone = [SplitServer(copy.deepcopy(tail), lr=0.0, device="cuda").serve([r])[0] for r in reqs]
    by_agent = {r.request.agent_id: r for r in together}
    for a in alone:
        b = by_agent[a.request.agent_id]
        assert abs(a.loss - b.loss) < 1e-4 * abs(a.loss)
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6)
        assert b.grad.device.type == "cpu"

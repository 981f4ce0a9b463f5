"""The server side of split learning: the tail's forward, loss and backward over micro-batches.

Pure torch: no broker, no metrics. Requests from many agents are sorted by sequence length,
packed into micro-batches under a token budget (each padded to its longest member, with the
padding masked out of attention and loss), run as one forward/backward each, and the shared
tail LoRA steps once per micro-batch. Each agent gets the gradient of its own mean loss with
respect to its own activations: exactly what it would get if served alone. A repeated request
(same agent, same step) is answered from a small per-agent cache and never trained twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from broker import activations, codec
from broker.errors import TopicError, WireError
from broker.messages import SplitForward, parse
from models.lm_loss import lm_loss_per_sequence_group


@dataclass
class SplitRequest:
    agent_id: str
    step: int
    act: torch.Tensor  # (B, T, C) float32, on CPU as decoded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) int64, -100 = no loss
    correlation: bytes | None = None
    response_topic: str | None = None
    encoding: str = "fp32"
    received: float = field(default_factory=time.monotonic)
    evaluate: bool = False  # loss only: SplitServer.evaluate, no backward, no step


@dataclass
class SplitReply:
    request: SplitRequest
    grad: torch.Tensor | None  # (B, T, C) float32 on CPU; None for an evaluation
    loss: float
    tokens: int
    server_step: int
    cached: bool = False


class BadSplitRequest(WireError):
    reason = "bad_tensors"


def decode_split_request(agent_id: str, payload: bytes, *, max_bytes: int, hidden: int | None, max_tokens: int,
                         correlation: bytes | None, response_topic: str) -> SplitRequest:
    """A split forward frame from `agent_id`'s topic as a SplitRequest; raises WireError (reason
    bad_topic, bad_tensors, or the codec's) or activations.EncodingError for anything malformed."""
    frame = codec.decode(payload, max_size=max_bytes)
    msg = parse(frame.header, SplitForward)
    if msg.agent_id != agent_id:
        raise TopicError(f"activations claim {msg.agent_id} but came on {agent_id}'s topic")
    act = activations.decode(frame.tensors, msg.encoding, "act")
    mask = frame.tensors.get("attention_mask")
    labels = frame.tensors.get("labels")
    if (act.dim() != 3 or mask is None or labels is None or tuple(mask.shape) != tuple(act.shape[:2])
            or tuple(labels.shape) != tuple(act.shape[:2]) or labels.dtype != torch.int64
            or (hidden and act.shape[-1] != hidden) or act.shape[0] * act.shape[1] > max_tokens):
        raise BadSplitRequest(f"split request from {agent_id}: shapes {tuple(act.shape)} do not fit")
    return SplitRequest(agent_id, msg.step, act, mask, labels, correlation, response_topic, msg.encoding,
                        evaluate=msg.evaluate)


class SplitBatcher:
    """When to serve split requests: gather them until every agent the round still waits for has
    one queued, or until `window_s` after the first one arrived; then they are one micro-batch
    set. Pure: the driver gives the time."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._queue: list[SplitRequest] = []
        self._first: float | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, req: SplitRequest, now: float | None = None) -> None:
        if not self._queue:
            self._first = req.received if now is None else now
        self._queue.append(req)

    def ready(self, waiting_for: int, now: float) -> bool:
        agents = len({r.agent_id for r in self._queue})
        return not self._queue or agents >= waiting_for or now >= self._first + self.window_s

    def wait_s(self, now: float) -> float:
        return 0.0 if self._first is None else max(0.0, self._first + self.window_s - now)

    def take(self) -> list[SplitRequest]:
        batch, self._queue, self._first = self._queue, [], None
        return batch


class SplitServer:
    def __init__(self, tail, *, lr: float = 1e-3, device: str | torch.device | None = None,
                 max_tokens: int = 65536, cache_per_agent: int = 4, autocast_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tail = tail.to(self.device)
        self.tail.train()
        self.params = [p for p in self.tail.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.max_tokens = max_tokens
        self.cache_per_agent = cache_per_agent
        self.autocast_dtype = autocast_dtype
        self.server_step = 0
        self._cache: dict[str, OrderedDict[int, SplitReply]] = {}

    # -- cache ------------------------------------------------------------------------------
    def cached(self, agent_id: str, step: int) -> SplitReply | None:
        return self._cache.get(agent_id, {}).get(step)

    def _remember(self, r: SplitReply) -> None:
        c = self._cache.setdefault(r.request.agent_id, OrderedDict())
        c[r.request.step] = r
        while len(c) > self.cache_per_agent:
            c.popitem(last=False)

    # -- batching ---------------------------------------------------------------------------
    def micro_batches(self, requests: list[SplitRequest]) -> list[list[SplitRequest]]:
        """Sorted by length, greedily packed while (rows x longest T) stays within max_tokens."""
        out: list[list[SplitRequest]] = []
        cur: list[SplitRequest] = []
        rows = 0
        for r in sorted(requests, key=lambda r: r.act.shape[1]):
            b, t = r.act.shape[:2]
            if cur and (rows + b) * t > self.max_tokens:
                out.append(cur)
                cur, rows = [], 0
            cur.append(r)
            rows += b
        if cur:
            out.append(cur)
        return out

    @staticmethod
    def _pad(x: torch.Tensor, t: int, value) -> torch.Tensor:
        if x.shape[1] == t:
            return x
        return torch.cat([x, x.new_full((x.shape[0], t - x.shape[1], *x.shape[2:]), value)], dim=1)

    def _forward(self, batch: list[SplitRequest], grad: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[slice]]:
        """One micro-batch through the tail: (activations, each request's loss, each request's rows).
        Each request goes to the device as it is, then is padded (masked out of attention and loss)
        and concatenated there; `grad`: the activations require grad (training)."""
        t_max = max(r.act.shape[1] for r in batch)
        dev = self.device
        acts = torch.cat([self._pad(r.act.to(dev, non_blocking=True), t_max, 0.0) for r in batch])
        mask = torch.cat([self._pad(r.attention_mask.to(dev, non_blocking=True).long(), t_max, 0) for r in batch])
        labels = torch.cat([self._pad(r.labels.to(dev, non_blocking=True), t_max, -100) for r in batch])
        acts.requires_grad_(grad)
        groups, start = [], 0
        for r in batch:
            groups.append(slice(start, start + r.act.shape[0]))
            start += r.act.shape[0]
        with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.tail(acts, mask)  # (sum B, T, V)
        return acts, lm_loss_per_sequence_group(logits, labels, groups), groups

    def _run(self, batch: list[SplitRequest]) -> list[SplitReply]:
        dev = self.device
        acts, losses, groups = self._forward(batch, grad=True)
        total = torch.stack(losses).sum()
        self.opt.zero_grad(set_to_none=True)
        total.backward()  # d total / d act_i = d loss_i / d act_i for every agent i
        n = len(batch)
        for p in self.params:  # the tail steps on the mean of the agents' losses
            if p.grad is not None:
                p.grad.div_(n)
        self.opt.step()
        self.server_step += 1
        # one copy of all gradients back to the host (pinned, on a GPU), then per-agent views
        grads = acts.grad.detach().float()
        if dev.type == "cuda":
            host = torch.empty(grads.shape, dtype=grads.dtype, pin_memory=True)
            host.copy_(grads, non_blocking=True)
        else:
            host = grads
        loss_values = torch.stack([l.detach() for l in losses]).float().cpu().tolist()  # synchronises
        replies = []
        for r, g, loss in zip(batch, groups, loss_values):
            t = r.act.shape[1]
            tokens = int((r.labels[:, 1:] != -100).sum())
            replies.append(SplitReply(r, host[g, :t], loss, tokens, self.server_step))
        return replies

    @torch.no_grad()
    def evaluate(self, requests: list[SplitRequest]) -> list[SplitReply]:
        """Federated evaluation: each request's mean next-token loss under the tail as it is, in
        micro-batches; no backward, no optimiser step, nothing cached (the tail's state is unchanged)."""
        replies = []
        self.tail.eval()
        try:
            for batch in self.micro_batches(requests):
                _, losses, _ = self._forward(batch, grad=False)
                for r, loss in zip(batch, losses):
                    tokens = int((r.labels[:, 1:] != -100).sum())
                    replies.append(SplitReply(r, None, float(loss), tokens, self.server_step))
        finally:
            self.tail.train()
        return replies

    def serve(self, requests: list[SplitRequest]) -> list[SplitReply]:
        """Answer every request: from the cache if seen before, else by training on it."""
        replies, fresh, seen = [], [], set()
        for r in requests:
            key = (r.agent_id, r.step)
            hit = self.cached(*key)
            if hit is not None or key in seen:
                if hit is not None:
                    replies.append(SplitReply(r, hit.grad, hit.loss, hit.tokens, hit.server_step, cached=True))
                continue  # a duplicate within this batch: the first copy answers it
            seen.add(key)
            fresh.append(r)
        for batch in self.micro_batches(fresh):
            for rep in self._run(batch):
                self._remember(rep)
                replies.append(rep)
        return replies

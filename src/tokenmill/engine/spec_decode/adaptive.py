"""How many tokens to propose, per request and per step, from measured costs and each request's acceptance.

A step's time is modelled as a + b * tokens + c * verify_chunks (a verify chunk runs the multi-token attention
path instead of the batched decode kernel), fitted to recent steps by exponentially forgotten ridge regression;
proposing costs p per draft token (a running mean of the proposer's measured time). A request whose drafts are
accepted at rate alpha yields alpha + alpha^2 + ... + alpha^k extra tokens from k proposed ones. The plan
maximises expected tokens per second over the whole step (Dinkelbach iterations; separable per request), so
k shrinks as acceptance drops, and goes to 0 for everyone once a bigger batch makes tokens expensive relative to
the step's fixed cost: then the step is an ordinary decode step. Nothing here is a tuned threshold: the
comparison of "tokens/s with" against "tokens/s without" falls out of the fitted costs.
Acceptance is kept per request and proposer (a "mix" config drafts each request with the proposer it accepts
best, config.py), with each proposer's recent acceptance over all requests as the prior.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

WARMUP_STEPS = 4  # steps speculating fully before the cost model is trusted (it needs a few samples)
DECAY = 0.95  # step-time samples lose weight by this factor per step: the fit follows the last ~20 steps
ACCEPT_DECAY = 0.9  # per-request acceptance follows roughly its last 10 verifications (fewer: all-accepted short
# drafts could never show an acceptance rate high enough to make the next ones longer)
IDLE_DECAY = 0.97  # a request not speculating drifts back toward the prior, so it is retried now and then
OVERALL_DECAY = 0.99  # the prior of a new request: all requests' acceptance over roughly the last 100 verifications


class StepTimeModel:
    """seconds ~= a + b * tokens + c * verify_chunks; b and c are ridge-regularised toward 0 (until steps of
    different sizes are seen, extra tokens look free, which makes the controller try them and so measure them)."""

    def __init__(self, ridge: float = 1.0) -> None:
        self.xtx = torch.zeros(3, 3, dtype=torch.float64)
        self.xty = torch.zeros(3, dtype=torch.float64)
        self.ridge = torch.diag(torch.tensor([0.0, ridge, ridge], dtype=torch.float64))
        self.num_samples = 0

    def observe(self, num_tokens: int, num_verify_chunks: int, seconds: float) -> None:
        x = torch.tensor([1.0, num_tokens, num_verify_chunks], dtype=torch.float64)
        self.xtx = DECAY * self.xtx + torch.outer(x, x)
        self.xty = DECAY * self.xty + x * seconds
        self.num_samples += 1

    def coefficients(self) -> tuple[float, float, float]:
        a, b, c = torch.linalg.solve(self.xtx + self.ridge, self.xty).tolist()
        return max(a, 0.0), max(b, 0.0), max(c, 0.0)


class AdaptiveController:
    def __init__(self, max_tokens: int, mode: str) -> None:
        self.max_tokens = max_tokens
        self.mode = mode
        self.step_time = StepTimeModel()
        self.draft_seconds = 0.0  # forgotten sums: proposer seconds and draft tokens, their ratio is p
        self.draft_tokens = 0.0
        # (request, proposer) -> [accepted, rejections], forgotten sums; the same per proposer over all requests
        self.acceptance: dict[tuple[str, str], list[float]] = {}
        self.overall: dict[str, list[float]] = {}

    def alpha(self, request_id: str, method: str = "") -> float:
        """Per-token acceptance estimate (geometric model) of `method`'s drafts for the request. The prior, worth
        two observations, is what recent requests' drafts from it were accepted at (itself from a Beta(1, 1)
        prior): a new request in a workload that copies starts with long drafts, one in open chat with short ones
        or none."""
        accepted, rejections = self.acceptance.get((request_id, method), (0.0, 0.0))
        overall_accepted, overall_rejections = self.overall.get(method, (0.0, 0.0))
        prior = (overall_accepted + 1.0) / (overall_accepted + overall_rejections + 2.0)
        return (accepted + 2.0 * prior) / (accepted + rejections + 2.0)

    def plan(self, request_ids: Sequence[str], limits: Sequence[int],
             methods: Sequence[str] | None = None) -> list[int]:
        """Tokens to propose for each decoding request (each at most its limit and max_tokens), drafted by
        methods[i] (default: the one proposer)."""
        methods = methods or [""] * len(request_ids)
        caps = [max(0, min(self.max_tokens, limit)) for limit in limits]
        if self.mode == "never":
            return [0] * len(caps)
        if self.mode == "always" or self.step_time.num_samples < WARMUP_STEPS:
            return caps
        a, b, c = self.step_time.coefficients()
        per_token = b + (self.draft_seconds / self.draft_tokens if self.draft_tokens else 0.0)
        gains = [_cumulative_gains(self.alpha(r, m), cap) for r, m, cap in zip(request_ids, methods, caps)]
        ks = [0] * len(caps)
        for _ in range(8):  # Dinkelbach: rate = N/D, then maximise N - rate * D; converges in a few rounds
            tokens = len(caps) + sum(g[k] for g, k in zip(gains, ks))
            seconds = a + b * len(caps) + per_token * sum(ks) + c * sum(k > 0 for k in ks)
            rate = tokens / seconds if seconds > 0 else float("inf")
            if rate == float("inf"):
                new = caps
            else:
                new = [max(range(len(g)), key=lambda k, g=g: g[k] - rate * (per_token * k + c * (k > 0)))
                       for g in gains]
            if new == ks:
                break
            ks = new
        for key, k in zip(zip(request_ids, methods), ks):
            if not k and key in self.acceptance:
                self.acceptance[key] = [v * IDLE_DECAY for v in self.acceptance[key]]
        return ks

    def observe_step(self, num_tokens: int, num_verify_chunks: int, seconds: float) -> None:
        self.step_time.observe(num_tokens, num_verify_chunks, seconds)

    def observe_proposal(self, num_tokens: int, seconds: float) -> None:
        self.draft_seconds = DECAY * self.draft_seconds + seconds
        self.draft_tokens = DECAY * self.draft_tokens + num_tokens

    def observe_acceptance(self, request_id: str, num_draft_tokens: int, num_accepted: int, method: str = "") -> None:
        rejected = num_accepted < num_draft_tokens
        accepted, rejections = self.acceptance.get((request_id, method), (0.0, 0.0))
        self.acceptance[request_id, method] = [ACCEPT_DECAY * accepted + num_accepted,
                                               ACCEPT_DECAY * rejections + rejected]
        overall = self.overall.get(method, (0.0, 0.0))
        self.overall[method] = [OVERALL_DECAY * overall[0] + num_accepted, OVERALL_DECAY * overall[1] + rejected]

    def retain(self, request_ids: set[str]) -> None:
        for key in [key for key in self.acceptance if key[0] not in request_ids]:
            del self.acceptance[key]


def _cumulative_gains(alpha: float, cap: int) -> list[float]:
    """[0, alpha, alpha + alpha^2, ...]: expected accepted tokens from k = 0..cap proposed ones."""
    gains, term = [0.0], 1.0
    for _ in range(cap):
        term *= alpha
        gains.append(gains[-1] + term)
    return gains

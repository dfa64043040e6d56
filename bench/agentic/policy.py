"""What the agent client does when the runtime refuses it: pure decisions, no I/O.

A real agent framework does one of two things with a refusal, and records it:

* **its claim is refused** (`409 no_admit`: the claim budget is spent, or the prefix could
  never be resident beside the hard claims): back off and retry a few times while the tool
  is still running, then **fall back** to running without a claim (the next turn may then
  recompute; nothing is lost but time);
* **its turn is refused** (`409 active_refusal`, or a stream that ends with
  `finish_reason: "abort"`: other agents' hard claims leave no room for the prompt): back
  off and retry; after `turn_retries` refusals the turn **fails** and the session stops
  (recorded, never retried forever: the failure mode claims exist to make visible).

Background one-shot clients retry a refused request after `backoff_s` for as long as the
run lasts; each refusal is counted against the claims configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["retry", "fallback", "fail"]


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0


@dataclass(frozen=True)
class RefusalPolicy:
    backoff_s: float = 0.2  # first back-off; doubles per attempt
    backoff_max_s: float = 2.0
    claim_retries: int = 2
    turn_retries: int = 6

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))

    def after_claim_refused(self, attempt: int, time_left_s: float) -> Decision:
        """`attempt` refusals so far for this claim; `time_left_s` of the tool pause left.
        A retry that would outlast the pause is pointless: the next turn needs the context
        now, so fall back to no claim."""
        delay = self.backoff(attempt)
        if attempt > self.claim_retries or delay >= time_left_s:
            return Decision("fallback")
        return Decision("retry", delay)

    def after_turn_refused(self, attempt: int) -> Decision:
        if attempt > self.turn_retries:
            return Decision("fail")
        return Decision("retry", self.backoff(attempt))


def recomputed_tokens(known: int, prompt_tokens: int, cached_tokens: int) -> int:
    """Tokens of a turn's prompt that had been computed before and were computed again.

    `known` is how much of the prompt an earlier turn of the same session computed (its
    prompt plus all but the last decoded token, whose KV is never computed). The rest of
    the prompt (the new tool result) is new work, not recomputation, whatever the cache."""
    if not 0 <= cached_tokens <= prompt_tokens:
        raise ValueError(f"cached_tokens {cached_tokens} outside 0..{prompt_tokens}")
    return max(0, min(known, prompt_tokens) - cached_tokens)

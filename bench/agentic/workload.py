"""A seeded multi-turn tool-calling agent workload, and the background traffic beside it.

The shape (a "ReAct" agent session, as in Continuum, arXiv 2511.02230, §2):

    turn 1   prompt = system prefix (shared by every agent) + the session's task
             -> the model decodes a tool call
    pause    the tool runs; the agent's context sits idle on the server
    turn t   prompt = everything so far + the tool's result -> the next tool call
    ...      the last turn decodes the answer; no tool follows it

Every prompt of a session extends the previous one, so everything but the newest tool result
was computed before: what the server recomputes of it is the waste claims are meant to cut.
Background traffic is one-shot requests with unique prompts, sent in a closed loop, which
fill the KV pool and evict the idle agents' contexts on a server without retention.

Each parameter's source is in `PARAMETER_SOURCES`; the distributions' *shapes* come from the
cited work, their *values* are chosen to fit the pool (80 blocks of 32 tokens on the CPU
machine) and are not fitted to a trace. Token ids are random in [1, 500) (the generated tiny
model's vocabulary is 512), drawn from one `random.Random(seed)` per session, so the workload
is a pure function of its parameters: the same seed gives the same sessions in every
configuration and every run.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields

TOKEN_LOW, TOKEN_HIGH = 1, 500


@dataclass(frozen=True)
class Params:
    """Every knob of the workload (each one is a command-line option of run.py)."""

    seed: int = 17
    agents: int = 3  # sessions in flight at once
    sessions: int = 9  # sessions in total (each agent runs sessions/agents of them, one after another)
    system_tokens: int = 128  # the shared system prefix (instructions + tool schemas)
    task_tokens_min: int = 64
    task_tokens_max: int = 160
    turns_min: int = 4
    turns_max: int = 6
    decode_median: int = 24  # tokens the model decodes per turn (the tool call)
    decode_sigma: float = 0.5
    decode_min: int = 8
    decode_max: int = 64
    tool_result_median: int = 48  # tokens a tool returns (appended before the next turn)
    tool_result_sigma: float = 0.6
    tool_result_min: int = 16
    tool_result_max: int = 160
    pause_median_s: float = 1.5  # how long a tool call takes
    pause_sigma: float = 0.8
    pause_min_s: float = 0.2
    pause_max_s: float = 8.0
    background_concurrency: int = 2  # one-shot clients, each sending back to back
    background_blocks_min: int = 4  # background prompt length, in blocks ...
    background_blocks_max: int = 12
    background_odd_tokens_max: int = 31  # ... plus up to this many tokens
    background_max_tokens: int = 16
    block_size: int = 32

    def validate(self) -> None:
        """Raise ValueError (one line) on an impossible combination."""
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and isinstance(value, (int, float)) and value < 0:
                problems.append(f"{f.name} must be >= 0 (got {value})")
        for low, high in (("task_tokens_min", "task_tokens_max"), ("turns_min", "turns_max"),
                          ("decode_min", "decode_max"), ("tool_result_min", "tool_result_max"),
                          ("pause_min_s", "pause_max_s"),
                          ("background_blocks_min", "background_blocks_max")):
            if getattr(self, low) > getattr(self, high):
                problems.append(f"{low} ({getattr(self, low)}) > {high} ({getattr(self, high)})")
        if self.agents < 1 or self.sessions < self.agents:
            problems.append(f"need 1 <= agents <= sessions (got agents={self.agents}, sessions={self.sessions})")
        if self.turns_min < 1 or self.decode_min < 1 or self.block_size < 1:
            problems.append("turns_min, decode_min and block_size must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    def longest_context(self) -> int:
        """An upper bound on a session's last prompt (to check it against the pool)."""
        return (self.system_tokens + self.task_tokens_max
                + (self.turns_max - 1) * (self.decode_max + self.tool_result_max))


# Where each parameter comes from. "shape" is cited; the values are this benchmark's.
PARAMETER_SOURCES: dict[str, str] = {
    "session shape": "ReAct-style agent: LLM call, tool call, LLM call on the grown context "
                     "(Continuum, arXiv 2511.02230, §2; the SWE-bench/BFCL agents it traces)",
    "system_tokens": "shared instructions + tool schemas, identical across sessions and so "
                     "cacheable across agents (Continuum §2; vLLM prefix caching); value scaled to "
                     "4 blocks of the 80-block CPU pool",
    "task_tokens": "uniform: the per-session task statement; value chosen, not fitted",
    "turns": "uniform integer: agent programs take several LLM calls per task (Continuum §2 "
             "reports programs of many turns); 4-6 keeps a session inside the 80-block pool",
    "decode": "log-normal (right-skewed output lengths, as in LLM serving traces generally); "
              "median 24 tokens = a short tool call; value chosen",
    "tool_result": "log-normal: tool outputs (file reads, test logs) are heavy-tailed (Continuum "
                   "§2); median 48 tokens, scaled to the pool",
    "pause": "log-normal: tool-call durations vary widely, milliseconds to tens of seconds "
             "(Continuum §2, §3 'limited predictability of tool call durations'); median 1.5 s, "
             "clamped to 0.2-8 s so a run fits in minutes; value chosen",
    "background": "closed-loop one-shot requests with unique prompts (no reuse), the KV pressure "
                  "that evicts idle agent contexts on a server without retention; value chosen so "
                  "two in flight fit next to the agents' claims",
}


@dataclass(frozen=True)
class Turn:
    decode_tokens: int  # max_tokens of this turn's completion (ignore_eos: exactly this many)
    tool_result: tuple[int, ...]  # appended after the turn (empty for the last turn)
    pause_s: float  # how long the tool runs after this turn (0 for the last turn)


@dataclass(frozen=True)
class Session:
    session_id: int
    agent: int  # the agent slot that runs it
    task: tuple[int, ...]
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Workload:
    params: Params
    system: tuple[int, ...]
    sessions: tuple[Session, ...]

    def sessions_of(self, agent: int) -> list[Session]:
        return [s for s in self.sessions if s.agent == agent]


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n))


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(max(median, 1e-9)), sigma))))


def _lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    return max(low, min(high, rng.lognormvariate(math.log(max(median, 1e-9)), sigma)))


def generate(params: Params) -> Workload:
    """The workload for `params`: a pure function (same params, same workload)."""
    params.validate()
    system = _tokens(random.Random(f"{params.seed}/system"), params.system_tokens)
    sessions = []
    for sid in range(params.sessions):
        rng = random.Random(f"{params.seed}/session/{sid}")
        task = _tokens(rng, rng.randint(params.task_tokens_min, params.task_tokens_max))
        n_turns = rng.randint(params.turns_min, params.turns_max)
        turns = []
        for t in range(n_turns):
            decode = _lognormal_int(rng, params.decode_median, params.decode_sigma,
                                    params.decode_min, params.decode_max)
            if t == n_turns - 1:
                turns.append(Turn(decode, (), 0.0))
                continue
            result = _tokens(rng, _lognormal_int(rng, params.tool_result_median, params.tool_result_sigma,
                                                 params.tool_result_min, params.tool_result_max))
            pause = _lognormal(rng, params.pause_median_s, params.pause_sigma,
                               params.pause_min_s, params.pause_max_s)
            turns.append(Turn(decode, result, round(pause, 3)))
        sessions.append(Session(sid, sid % params.agents, task, tuple(turns)))
    return Workload(params, system, tuple(sessions))


def background_request(params: Params, worker: int, index: int) -> tuple[list[int], int]:
    """The `index`-th background prompt of `worker` and its max_tokens (a pure function)."""
    rng = random.Random(f"{params.seed}/background/{worker}/{index}")
    n = (rng.randint(params.background_blocks_min, params.background_blocks_max) * params.block_size
         + rng.randint(0, params.background_odd_tokens_max))
    return list(_tokens(rng, n)), params.background_max_tokens


def describe(params: Params) -> dict:
    return {**asdict(params), "longest_context_tokens": params.longest_context()}


# A workload for vendors' GPU runners (with --rkv-model). The pool is still the driver's
# canonical 80 blocks (see README: the driver has no pool-size option yet), so the profile
# scales concurrency and pauses, not context length.
GPU_PROFILE = dict(agents=6, sessions=36, turns_min=4, turns_max=8, background_concurrency=8,
                   pause_median_s=3.0, pause_max_s=20.0, decode_median=32)

"""Multi-turn episodes: a batch of games played in lock-step through the shared generation loop.

Each round, every unfinished episode's token sequence so far goes into one `generate` call; the
reply tokens are appended as a trained segment, the game steps on the decoded reply, and its
observation is appended as an untrained segment. Two views of every episode are built side by side:

    student view   segments          [turn-0 prompt | reply 0 | env 1 | reply 1 | ... ]
    teacher view   context_segments  [context + turn-0 prompt | reply 0 | env 1 | reply 1 | ...]

The trained segments (the replies) are the same tokens in both views, so `pack_segments` aligns
teacher and student logits on every reply token of every turn; everything else (template tokens,
observations, the context) is untrained.

Tokens are never re-tokenised: a reply enters the transcript as the ids that were sampled. The
untrained tokens between replies come from the chat template, rendered as a *delta*: the
conversation so far (earlier replies as placeholders) is rendered with the new user turn and the
generation prompt, and the tokens after the previous rendering and the placeholder are the delta
(the placeholder's extent is found by rendering twice with different placeholders). The previous
rendering must be a prefix of the new one (checked; a template that rewrites earlier turns raises
TemplateError). When the reply ended with the token the template closes a turn with (EOS, e.g.
<|im_end|>), that token is the reply's (trained) and not repeated. Without a chat template the
transcript is plain text: the turn-0 prompt, then per round the reply and "\n\n" + observation + "\n".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from megatron_opcd.errors import TemplateError

Segments = list[tuple[list[int], bool]]
Policy = Callable[[list[list[int]], int], tuple[list[list[int]], Optional[list[list[float]]]]]
"""policy(token sequences of the unfinished episodes, round) -> (one reply (token ids) each, their
sampling log-probs or None)."""


@dataclass
class GameSetup:
    """Which game, and how its episodes are rendered: what `play_episodes` needs besides the model."""

    name: str
    max_rounds: int = 5
    options: dict = field(default_factory=dict)
    use_chat_template: bool = True
    placement: str = "system"
    separator: str = "\n\n"
    max_total_tokens: Optional[int] = None

    def games(self, n: int) -> list:
        from megatron_opcd.envs import get_game

        return [get_game(self.name, max_rounds=self.max_rounds, **self.options) for _ in range(n)]

    @property
    def render_kwargs(self) -> dict:
        return dict(use_chat_template=self.use_chat_template, placement=self.placement, separator=self.separator,
                    max_total_tokens=self.max_total_tokens)


@dataclass
class Episode:
    game: str
    seed: int
    segments: Segments
    """The student's view (no context): (token ids, trained) segments; trained = its replies."""
    context_segments: Segments
    """The teacher's view: the same with the context in the first turn (== segments without one)."""
    context: Optional[str] = None
    replies: list[str] = field(default_factory=list)
    """The decoded replies, one per round played."""
    observations: list[str] = field(default_factory=list)
    """The first observation, then the game's answer to each reply (the last one: the outcome)."""
    success: bool = False
    rounds: int = 0
    invalid: int = 0
    """Rounds whose reply held no action or an illegal one."""
    truncated: bool = False
    """Stopped before the game ended: the next turn would not fit in the model's positions."""
    logprobs: list[float] = field(default_factory=list)
    """The player's sampling log-prob of each reply token, all turns (empty if the policy gives none)."""

    @property
    def response_tokens(self) -> list[int]:
        """Every token the player generated, all turns, in order (what the loss covers)."""
        return [t for ids, trained in self.segments if trained for t in ids]

    def transcript(self) -> str:
        """A readable record: the observations and replies in turn order (for reflections and logs)."""
        parts = [f"OBSERVATION:\n{self.observations[0]}"] if self.observations else []
        for k, reply in enumerate(self.replies):
            parts.append(f"YOUR MOVE {k + 1}:\n{reply.strip()}")
            if k + 1 < len(self.observations):
                parts.append(f"OBSERVATION:\n{self.observations[k + 1]}")
        return "\n\n".join(parts)


def flatten(segments: Segments) -> list[int]:
    return [t for ids, _ in segments for t in ids]


def drop_prefix(segments: Segments, n: int) -> Segments:
    """`segments` without their first `n` tokens (a cached prefix); those tokens must be untrained."""
    out: Segments = []
    for ids, trained in segments:
        if n > 0:
            if trained:
                raise ValueError("a cached prefix may not cover trained tokens")
            cut = min(n, len(ids))
            ids, n = ids[cut:], n - cut
            if not ids:
                continue
        out.append((list(ids), trained))
    return out


class TurnRenderer:
    """The untrained tokens of one view of one episode, turn by turn (see the module docstring)."""

    PLACEHOLDERS = ("0", "1")

    def __init__(self, tokenizer, *, use_chat_template: bool, context: Optional[str] = None,
                 placement: str = "system", separator: str = "\n\n"):
        self.tok = tokenizer
        self.chat = use_chat_template and bool(getattr(tokenizer, "has_chat_template", False))
        self.context, self.placement, self.separator = context, placement, separator
        self.eos = set(getattr(tokenizer, "eos_ids", ()))
        self.messages: list[dict] = []
        self.rendered: list[int] = []

    def start(self, first_user: str) -> list[int]:
        """Tokens up to the first reply (the generation prompt included)."""
        c = self.context
        if self.chat:
            if c is None:
                self.messages = [{"role": "user", "content": first_user}]
            elif self.placement == "system":
                self.messages = [{"role": "system", "content": c}, {"role": "user", "content": first_user}]
            else:
                self.messages = [{"role": "user", "content": c + self.separator + first_user}]
            self.rendered = list(self.tok.apply_chat_template(self.messages))
            return list(self.rendered)
        text = first_user if c is None else c + self.separator + first_user
        return list(self.tok.encode(text + "\n"))

    def between(self, reply: Sequence[int], observation: str) -> list[int]:
        """Tokens after `reply` up to the next reply: the turn's end, the user turn with
        `observation`, the generation prompt."""
        if not self.chat:
            return list(self.tok.encode("\n\n" + observation + "\n"))
        user = {"role": "user", "content": observation}
        full = [list(self.tok.apply_chat_template(self.messages + [{"role": "assistant", "content": p}, user]))
                for p in self.PLACEHOLDERS]
        n = len(self.rendered)
        if any(f[:n] != self.rendered for f in full):
            raise TemplateError(
                f"the chat template of {getattr(self.tok, 'name', 'the tokenizer')} renders earlier turns differently "
                "once a turn is added, so a multi-turn transcript cannot be built by appending turns; use "
                "data.chat_template=none (plain text) or a template without history rewriting")
        a, b = full
        tail = 0  # the common suffix: everything after the placeholder
        while tail < min(len(a), len(b)) - n - 1 and a[-1 - tail] == b[-1 - tail]:
            tail += 1
        delta = a[len(a) - tail:]
        self.messages = self.messages + [{"role": "assistant", "content": self.PLACEHOLDERS[0]}, user]
        self.rendered = a
        if reply and delta and reply[-1] == delta[0] and reply[-1] in self.eos:
            delta = delta[1:]  # the reply closed its turn itself: that token is the reply's (trained)
        return delta


def run_episodes(policy: Policy, tokenizer, games: Sequence, seeds: Sequence[int], *,
                 contexts: Union[None, str, Sequence[Optional[str]]] = None, act_with_context: bool = False,
                 use_chat_template: bool = True, placement: str = "system", separator: str = "\n\n",
                 max_total_tokens: Optional[int] = None, max_new_tokens_per_turn: int = 0) -> list[Episode]:
    """Play `games[i]` on level `seeds[i]` with `policy` (lock-step, one policy call per round).

    The player reads the student view, or the context view with `act_with_context` (the teacher
    playing: evaluation with the context, experience extraction). An episode whose next turn would
    exceed `max_total_tokens` (prompt so far + `max_new_tokens_per_turn`) stops, truncated and unsolved."""
    from megatron_opcd.envs.base import first_user_message

    if len(games) != len(seeds):
        raise ValueError(f"{len(games)} games but {len(seeds)} seeds")
    if contexts is None or isinstance(contexts, str):
        contexts = [contexts] * len(games)
    kw = dict(use_chat_template=use_chat_template, placement=placement, separator=separator)
    episodes, views = [], []
    for game, seed, ctx in zip(games, seeds, contexts):
        obs = game.reset(int(seed))
        first = first_user_message(game, obs)
        student = TurnRenderer(tokenizer, context=None, **kw)
        teacher = TurnRenderer(tokenizer, context=ctx, **kw) if ctx is not None else None
        s0 = student.start(first)
        t0 = teacher.start(first) if teacher else s0
        episodes.append(Episode(game.name, int(seed), [(s0, False)], [(t0, False)], ctx, observations=[obs]))
        views.append((student, teacher))
    rnd = 0
    while True:
        active = [i for i, g in enumerate(games) if not g.done and not episodes[i].truncated]
        seqs = {i: flatten(episodes[i].context_segments if act_with_context else episodes[i].segments)
                for i in active}
        if max_total_tokens is not None:
            for i in list(active):
                # Both views must fit: the teacher scores its (longer) view of the same transcript.
                longest = max(len(flatten(episodes[i].segments)), len(flatten(episodes[i].context_segments)))
                if longest + max_new_tokens_per_turn > max_total_tokens:
                    episodes[i].truncated = True
                    active.remove(i)
        if not active:
            break
        replies, logprobs = policy([seqs[i] for i in active], rnd)
        for k, (i, reply) in enumerate(zip(active, replies)):
            reply = list(reply)
            ep, (student, teacher) = episodes[i], views[i]
            if logprobs is not None:
                ep.logprobs.extend(logprobs[k])
            text = tokenizer.decode(reply)
            res = games[i].step(text)
            ep.replies.append(text)
            ep.observations.append(res.observation)
            ep.rounds += 1
            ep.invalid += int(not res.info.get("valid", True))
            ep.segments.append((reply, True))
            ep.context_segments.append((reply, True))
            if res.done:
                ep.success = bool(games[i].success)
                continue
            s = student.between(reply, res.observation)
            ep.segments.append((s, False))
            ep.context_segments.append((teacher.between(reply, res.observation) if teacher else s, False))
        rnd += 1
    return episodes


def model_policy(model, sampling, *, groups, vocab_size: int, tokenizer, between_steps=None) -> Policy:
    """A policy on a megatron model through the shared generation loop: one `generate` call per
    round, the episodes' common token prefix prefilled once; round r samples with seed + r.
    `between_steps` is the generation loop's callback (the trainer's preemption check)."""
    from megatron_opcd.data.render import common_prefix
    from megatron_opcd.generation import generate

    fallback = tokenizer.eos_ids[0]

    def policy(seqs: list[list[int]], rnd: int):
        params = dataclasses.replace(sampling, seed=(sampling.seed + 7_919 * rnd) % (2**63))
        prefix = common_prefix(seqs)
        out = generate(model, [s[len(prefix):] for s in seqs], params, groups=groups, vocab_size=vocab_size,
                       prefix=prefix or None, decode=tokenizer.decode, between_steps=between_steps)
        empty = [not r for r in out.responses]
        return ([list(r) if r else [fallback] for r in out.responses],
                [list(lp) if not e else [0.0] for lp, e in zip(out.logprobs, empty)])

    return policy


def play_episodes(model, tokenizer, games: Sequence, seeds: Sequence[int], sampling, *, groups, vocab_size: int,
                  context: Union[None, str, Sequence[Optional[str]]] = None, act_with_context: bool = False,
                  use_chat_template: bool = True, placement: str = "system", separator: str = "\n\n",
                  max_total_tokens: Optional[int] = None, between_steps=None) -> list[Episode]:
    """`run_episodes` with the model as the player (`sampling.max_new_tokens` is the limit per
    turn). Call on every rank of the model with the same arguments: every rank gets the same
    episodes (the games are deterministic, the sampled tokens are broadcast)."""
    policy = model_policy(model, sampling, groups=groups, vocab_size=vocab_size, tokenizer=tokenizer,
                          between_steps=between_steps)
    return run_episodes(policy, tokenizer, games, seeds, contexts=context, act_with_context=act_with_context,
                        use_chat_template=use_chat_template, placement=placement, separator=separator,
                        max_total_tokens=max_total_tokens, max_new_tokens_per_turn=sampling.max_new_tokens)

"""Judges: score the accumulated replies against a gold answer (0/1/2), and say whether a reply repeats earlier ones.

Three judges share one small interface (:class:`Judge`):

- :class:`StrictJudge` (``strict``, the default, offline, deterministic): fact by fact (eval/facts.py). Any claim of
  the replies that contradicts the gold answer (another event kind, colour, shape or count) scores 0; 2 needs every
  fact of the gold said; the question is never evidence.
- :class:`OverlapJudge` (``overlap``, the previous default, kept for continuity with the numbers it produced):
  weighted recall of the gold answer's content words among the replies' content words, where colour, shape and
  number words weigh double, must all be present for a 2, and a conflicting one caps the score at 1. It is lenient:
  a wrong shape or colour scores 1, a wrong event kind 2, and the first question's words count as said.
- :class:`OpenAIJudge`: any OpenAI-compatible chat endpoint (``--judge openai:MODEL@http://host:port/v1``), asked
  the 0/1/2 rubric with temperature 0. Timeouts, retries with exponential backoff; an answer that is not a score
  comes back as ``Judgement(None, raw)`` and is counted as unparsed by the evaluator, never guessed.

Both are plain objects: the evaluator plans every request first, then runs them (through the on-disk cache, on
``max_workers`` threads), so a judge never sees the dataset, only :class:`JudgeRequest` values.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol, Sequence

from edge_duet.errors import JudgeError, UsageError

from . import facts
from .textnorm import content_tokens, key_category, normalise


@dataclass(frozen=True)
class Judgement:
    score: int | None  # 0/1/2 for "score" requests, 1 (duplicate) / 0 (new) for "duplicate" ones; None: unparsed
    raw: str  # the judge's own words (the LLM's reply, or the overlap judge's arithmetic)


@dataclass(frozen=True)
class JudgeRequest:
    """One question to a judge. kind "score": answer + accumulated replies; kind "duplicate": earlier + reply."""

    kind: str
    question: str = ""
    answer: str = ""
    replies: tuple[str, ...] = ()  # "score": the accumulated replies; "duplicate": the earlier replies
    reply: str = ""  # "duplicate": the reply under test


class Judge(Protocol):
    id: str  # stable name of the judging function (model + rubric version): part of the cache key
    cacheable: bool  # whether results are worth keeping on disk
    max_workers: int  # threads the evaluator may use for this judge

    def score(self, question: str, answer: str, replies: Sequence[str]) -> Judgement: ...

    def is_duplicate(self, earlier: Sequence[str], reply: str) -> Judgement: ...


def run_request(judge: Judge, request: JudgeRequest) -> Judgement:
    if request.kind == "score":
        return judge.score(request.question, request.answer, request.replies)
    if request.kind == "duplicate":
        return judge.is_duplicate(request.replies, request.reply)
    raise ValueError(f"unknown judge request kind {request.kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# the offline judge


@dataclass(frozen=True)
class OverlapJudge:
    """Content-word overlap, deterministic. With G the gold answer's content words (minus words of the question,
    unless that leaves none) and R those of all accumulated replies, key words (colour/shape/number) weighing 2:

    - recall = weight(G ∩ R) / weight(G); precision = |G ∩ R| / |R|
    - 2 when recall >= ``full_recall``, every key word of G is in R, no conflicting key word is in R, and
      precision >= ``min_precision`` (a reply listing every colour is not an answer);
    - 1 when recall >= ``partial_recall`` and, if G has key words, at least one of them is in R;
    - 0 otherwise.

    A conflicting key word is one of a category the whole gold answer names (e.g. colour), question words
    included, that is not the answer's: "A blue circle" against "A red circle" scores 1, and so does "A blue
    circle appeared." against "A blue square appeared." for "Tell me when a square appears." (overlap-v1 missed
    this case). Because replies accumulate, a wrong reply keeps capping the score after the right one arrives,
    as the protocol intends.

    Duplicates: a reply repeats the earlier ones when its normalised text equals one of them, or every content word
    it has already occurred in them (it adds no information); a reply with no content words is new unless equal.
    """

    full_recall: float = 0.75
    partial_recall: float = 0.34
    min_precision: float = 0.2
    id: str = "overlap-v2"
    cacheable: bool = False  # cheaper to recompute than to look up
    max_workers: int = 1

    def score(self, question: str, answer: str, replies: Sequence[str]) -> Judgement:
        full_gold = content_tokens(answer)
        asked = content_tokens(question)
        gold = full_gold - asked if full_gold - asked else full_gold
        said: set[str] = set()
        for r in replies:
            said |= content_tokens(r)
        if not gold:  # an answer made only of stop words ("Yes."): exact text match or nothing
            hit = normalise(answer) in {normalise(r) for r in replies}
            return Judgement(2 if hit else 0, f"answer has no content words; exact match: {hit}")
        if not said:
            return Judgement(0, "replies have no content words")

        def weight(tokens: set[str]) -> int:
            return sum(2 if key_category(t) else 1 for t in tokens)

        hit = gold & said
        recall = weight(hit) / weight(gold)
        precision = len(hit) / len(said)
        gold_keys = {t for t in gold if key_category(t)}
        missing = gold_keys - said
        # conflicts are judged against the whole answer: "A blue circle appeared." is wrong about the shape when
        # the answer is "A blue square appeared.", even though the question ("... a square appears") named it
        all_keys = {t for t in full_gold if key_category(t)}
        conflicts = {t for t in said - full_gold if key_category(t) in {key_category(k) for k in all_keys}}
        if recall >= self.full_recall and not missing and not conflicts and precision >= self.min_precision:
            score = 2
        elif recall >= self.partial_recall and (not gold_keys or gold_keys & said):
            score = 1
        else:
            score = 0
        raw = (
            f"recall={recall:.2f} precision={precision:.2f} "
            f"missing_keys={sorted(missing)} conflicting_keys={sorted(conflicts)}"
        )
        return Judgement(score, raw)

    def is_duplicate(self, earlier: Sequence[str], reply: str) -> Judgement:
        text = normalise(reply)
        if text in {normalise(e) for e in earlier}:
            return Judgement(1, "same text as an earlier reply")
        words = content_tokens(reply)
        if not words:
            return Judgement(0, "no content words")
        seen: set[str] = set()
        for e in earlier:
            seen |= content_tokens(e)
        new = words - seen
        return Judgement(0 if new else 1, f"new content words: {sorted(new)}")


@dataclass(frozen=True)
class StrictJudge:
    """Fact by fact, deterministic. The gold answer and every accumulated reply are cut into claims
    (:func:`facts.claims`: event kind, colours, shapes, count, negation), then:

    - 0 when any claim contradicts the gold: another event kind ("The red star left." for "A red star appeared."),
      colour, shape or count, or a negation; a wrong claim stays said, so it keeps costing after a right one;
    - 2 when the claims together state every fact of the gold;
    - 1 when they state some of them (a missing colour: "A star appeared."); 0 when none.

    The question is not read: a fact the question names must still be said by the replies. A gold answer with no
    fact this judge knows (an answer outside the synthetic benchmark's world, "A donkey.") is judged by its content
    words instead: all said 2, some 1, none 0 (exact text for an answer of stop words only).

    Duplicates: a reply repeats the earlier ones when each of its claims is implied by one earlier claim ("The red
    star." after "A red star appeared."); a reply that states no fact falls back to the overlap judge's rule.
    """

    id: str = "strict-v1"
    cacheable: bool = False
    max_workers: int = 1

    def score(self, question: str, answer: str, replies: Sequence[str]) -> Judgement:
        gold_claims = facts.claims(answer)
        if not gold_claims:
            return self._score_words(answer, replies)
        gold = facts.merge(gold_claims)
        said = [c for r in replies for c in facts.claims(r)]
        for claim in said:
            wrong = facts.contradiction(claim, gold)
            if wrong is not None:
                return Judgement(0, f"contradiction: {wrong}")
        needed = gold.facts()
        stated = set().union(*(c.facts() for c in said)) & needed
        missing = sorted(f"{name} {value}" for name, value in needed - stated)
        score = 2 if not missing else 1 if stated else 0
        return Judgement(score, f"facts said {len(stated)}/{len(needed)}; missing: {missing}")

    def _score_words(self, answer: str, replies: Sequence[str]) -> Judgement:
        gold = content_tokens(answer)
        if not gold:
            hit = normalise(answer) in {normalise(r) for r in replies}
            return Judgement(2 if hit else 0, f"answer has no facts and no content words; exact match: {hit}")
        said = set().union(*(content_tokens(r) for r in replies)) if replies else set()
        missing = gold - said
        score = 2 if not missing else 1 if gold & said else 0
        return Judgement(score, f"answer has no known facts; content words missing: {sorted(missing)}")

    def is_duplicate(self, earlier: Sequence[str], reply: str) -> Judgement:
        new = facts.claims(reply)
        if not new:
            return OverlapJudge().is_duplicate(earlier, reply)
        before = [c for e in earlier for c in facts.claims(e)]
        fresh = [c for c in new if not any(facts.implied_by(c, b) for b in before)]
        return Judgement(0 if fresh else 1, f"claims not said before: {len(fresh)} of {len(new)}")


# ---------------------------------------------------------------------------------------------------------------
# the LLM judge

SCORE_RUBRIC = (
    "You grade a video assistant. Compare the assistant's replies (all of them so far, in order) with the reference "
    "answer and rate how well the replies cover the reference answer's key information:\n"
    "2 = covers all key information of the reference answer (rewording and small slips are fine);\n"
    "1 = partly right: some correct information, but key points missing or significant errors;\n"
    "0 = wrong, or unrelated to the reference answer, or most of its information missing.\n"
    "Reply with the single digit 0, 1 or 2 and nothing else."
)
DUPLICATE_RUBRIC = (
    "You check a video assistant for repetition. Given its earlier replies and a new reply, answer \"yes\" if all "
    "information in the new reply was already given in the earlier replies, or \"no\" if the new reply adds "
    "information. Reply with yes or no only."
)
RUBRIC_VERSION = "rubric-v1"  # bump when the prompts change: it is part of the cache key

API_KEY_ENVS = ("EDGE_DUET_JUDGE_API_KEY", "OPENAI_API_KEY")

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SCORE = re.compile(r"^\W*(?:score\W*)?([0-2])(?!\d)(?!\.\d)", re.IGNORECASE)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_score(text: str) -> int | None:
    """0/1/2 from an LLM reply such as "2", "**1**", "Score: 0"; None for anything else."""
    m = _SCORE.match(_THINK.sub("", text).strip())
    return int(m.group(1)) if m else None


def parse_yes_no(text: str) -> int | None:
    m = _YES_NO.match(_THINK.sub("", text).strip())
    return None if m is None else int(m.group(1).lower() == "yes")


@dataclass(frozen=True)
class OpenAIJudgeOptions:
    model: str
    base_url: str  # http://host:port/v1 (".../chat/completions" is appended unless already there)
    timeout_s: float = 60.0
    max_retries: int = 3  # retries after the first attempt, for timeouts, connection errors, 429 and 5xx
    backoff_s: float = 1.0  # wait before retry k (k = 0, 1, ...): backoff_s * 2**k
    max_workers: int = 4
    temperature: float = 0.0


class OpenAIJudge:
    """The 0/1/2 rubric asked of an OpenAI-compatible ``/chat/completions`` endpoint (stdlib HTTP, no SDK).

    The API key comes from ``$EDGE_DUET_JUDGE_API_KEY``, else ``$OPENAI_API_KEY``; local servers need none.
    """

    cacheable = True

    def __init__(self, options: OpenAIJudgeOptions):
        self.options = options
        url = options.base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.id = f"openai:{options.model}/{RUBRIC_VERSION}"
        self.max_workers = max(1, options.max_workers)
        self._api_key = next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)

    def score(self, question: str, answer: str, replies: Sequence[str]) -> Judgement:
        prompt = f"Question: {question}\nReference answer: {answer}\nAssistant replies: {' '.join(replies)}"
        raw = self._chat(SCORE_RUBRIC, prompt)
        return Judgement(parse_score(raw), raw)

    def is_duplicate(self, earlier: Sequence[str], reply: str) -> Judgement:
        prompt = f"Earlier replies: {' '.join(earlier)}\nNew reply: {reply}"
        raw = self._chat(DUPLICATE_RUBRIC, prompt)
        return Judgement(parse_yes_no(raw), raw)

    def _chat(self, system: str, user: str) -> str:
        body = json.dumps(
            {
                "model": self.options.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "temperature": self.options.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_error = ""
        for attempt in range(self.options.max_retries + 1):
            if attempt:
                time.sleep(self.options.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if exc.code == 429 or exc.code >= 500:
                    last_error = f"HTTP {exc.code}: {detail}"
                    continue
                hint = ""
                if exc.code in (401, 403):
                    hint = f" Set the API key in ${API_KEY_ENVS[0]} (or ${API_KEY_ENVS[1]})."
                raise JudgeError(f"the judge endpoint {self.url} refused the request: HTTP {exc.code} {detail}.{hint}")
            except (OSError, http.client.HTTPException) as exc:  # timeouts, refused/reset connections
                reason = getattr(exc, "reason", exc)
                last_error = f"timed out after {self.options.timeout_s} s" if _is_timeout(exc) else str(reason)
                continue
            return self._content(payload)
        raise JudgeError(
            f"the judge endpoint {self.url} failed {self.options.max_retries + 1} times (last: {last_error}). "
            "Check that the server is up and the URL ends in /v1; finished judgements are cached, so re-running "
            "resumes where this stopped."
        )

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = payload[:200].decode("utf-8", "replace")
            raise JudgeError(
                f"the judge endpoint {self.url} did not answer like an OpenAI chat completion: {snippet!r}. "
                "Point --judge at the API base, e.g. openai:MODEL@http://localhost:8000/v1"
            ) from None
        return content if isinstance(content, str) else ""


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


# ---------------------------------------------------------------------------------------------------------------

_OPENAI_SPEC = re.compile(r"^openai:(?P<model>.+?)@(?P<url>https?://\S+)$")


OFFLINE_JUDGES = {"strict": StrictJudge, "overlap": OverlapJudge}


def make_judge(spec: str = "strict", *, timeout_s: float = 60.0, max_workers: int = 4) -> Judge:
    """A judge from its command-line spelling: ``strict``, ``overlap`` or ``openai:MODEL@http://host:port/v1``."""
    if spec in OFFLINE_JUDGES:
        return OFFLINE_JUDGES[spec]()
    m = _OPENAI_SPEC.match(spec)
    if m is None:
        raise UsageError(
            f"unknown judge {spec!r}: use 'strict' (offline, fact by fact, the default), 'overlap' (offline, "
            "word overlap, the old default) or 'openai:MODEL@http://host:port/v1' for an OpenAI-compatible server"
        )
    return OpenAIJudge(
        OpenAIJudgeOptions(model=m["model"], base_url=m["url"], timeout_s=timeout_s, max_workers=max_workers)
    )


def make_judges(specs: str, *, timeout_s: float = 60.0, max_workers: int = 4) -> list[Judge]:
    """Judges from a comma-separated list (``strict,overlap``), in order; the first is the primary one."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise UsageError("--judge needs at least one judge, e.g. 'strict' or 'strict,overlap'")
    judges = [make_judge(n, timeout_s=timeout_s, max_workers=max_workers) for n in names]
    ids = [j.id for j in judges]
    if len(set(ids)) != len(ids):
        raise UsageError(f"--judge names a judge twice: {', '.join(names)}")
    return judges

"""evaluate(): gold answers + model replies + a judge -> EvalReport (PAUC per subset, duplicate %, reply counts).

Three passes, so an LLM judge can run in parallel and through the cache::

    plan     for every answer span: the replies inside it (t0 <= τ <= t1), the accumulated replies after each one
             -> JudgeRequest("score"), and for every reply after the first -> JudgeRequest("duplicate")
    resolve  each distinct request once: cache hit, else the judge (threads, progress bar)
    assemble scores -> step line -> PAUC per span -> summaries

Accumulated replies are those inside the span up to and including τp, each distinct (normalised) text once, as the
released evaluator does; a reply that repeats an earlier one of the span word for word adds no new information, so it
is not re-judged and the line keeps its height. Duplicate candidates are the in-span replies after the first of
each span; one is a duplicate when it repeats the replies *before it in the whole example* (exact normalised text,
decided here without a judge call, or by the judge's duplicate check).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from edge_duet.errors import InputError

from .formats import GoldExample, Prediction, Reply
from .judge_cache import JudgeCache
from .judges import Judge, Judgement, JudgeRequest, StrictJudge, run_request
from .pauc import DEFAULT_OMEGA, check_omega, in_span, pauc_span
from .report import EvalReport, ExampleResult, ScoredReply, SpanResult, summarise
from .textnorm import normalise


@dataclass
class _Planned:
    reply: Reply
    score_request: JudgeRequest | None  # None: a word-for-word repeat within the span, keeps the previous height
    duplicate_request: JudgeRequest | None
    exact_repeat: bool  # repeats an earlier reply of the example word for word
    candidate: bool  # not the first reply of its span


def index_predictions(preds: Mapping[str, Prediction] | Iterable[Prediction]) -> dict[str, Prediction]:
    if isinstance(preds, Mapping):
        return dict(preds)
    out: dict[str, Prediction] = {}
    for p in preds:
        if p.question_id in out:
            raise InputError(f"two predictions for question_id {p.question_id!r}; one per example")
        out[p.question_id] = p
    return out


def _plan_example(ex: GoldExample, replies: Sequence[Reply], requests: dict) -> list[list[_Planned]]:
    norms = [normalise(r.content) for r in replies]
    spans = []
    for ans in ex.answers:
        inside = [i for i, r in enumerate(replies) if in_span(r.time_s, ans.reply_timespan_s)]
        accumulated: list[str] = []
        seen: set[str] = set()
        planned = []
        for k, i in enumerate(inside):
            reply = replies[i]
            score_request = None
            if norms[i] not in seen:
                seen.add(norms[i])
                accumulated.append(reply.content)
                score_request = JudgeRequest("score", ex.question, ans.content, tuple(accumulated))
                requests.setdefault(score_request)
            exact = norms[i] in set(norms[:i])
            duplicate_request = None
            if k > 0 and not exact:
                earlier = tuple(dict.fromkeys(r.content for r in replies[:i]))
                duplicate_request = JudgeRequest("duplicate", replies=earlier, reply=reply.content)
                requests.setdefault(duplicate_request)
            planned.append(_Planned(reply, score_request, duplicate_request, exact, k > 0))
        spans.append(planned)
    return spans


def resolve(
    requests: Sequence[JudgeRequest], judge: Judge, cache: JudgeCache | None = None, progress: bool = False
) -> dict[JudgeRequest, Judgement]:
    """Answer every request once: from the cache when the judge is cacheable, else by the judge (in threads)."""
    results: dict[JudgeRequest, Judgement] = {}
    use_cache = cache is not None and judge.cacheable
    todo = []
    for req in requests:
        hit = cache.get(judge.id, req) if use_cache else None
        if hit is not None:
            results[req] = hit
        else:
            todo.append(req)
    if not todo:
        return results

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"judging ({judge.id})", unit="req", disable=not progress or len(todo) < 20)

    def done(req: JudgeRequest, judgement: Judgement) -> None:
        results[req] = judgement
        if use_cache:
            cache.put(judge.id, req, judgement)
        bar.update(1)

    try:
        if judge.max_workers <= 1:
            for req in todo:
                done(req, run_request(judge, req))
        else:
            with ThreadPoolExecutor(max_workers=judge.max_workers) as pool:
                futures = {pool.submit(run_request, judge, req): req for req in todo}
                try:
                    for fut in as_completed(futures):
                        done(futures[fut], fut.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return results


def evaluate(
    gold: Sequence[GoldExample],
    preds: Mapping[str, Prediction] | Iterable[Prediction],
    judge: Judge | None = None,
    omega: float = DEFAULT_OMEGA,
    *,
    cache: JudgeCache | None = None,
    progress: bool = False,
) -> EvalReport:
    """PAUC (x100 per subset and overall), duplicate % and reply counts of ``preds`` against ``gold``.

    Gold examples without a prediction count as silent (listed in ``missing_predictions``); predictions whose
    question_id is not in ``gold`` are ignored (listed in ``unmatched_predictions``).
    """
    judge = judge if judge is not None else StrictJudge()
    omega = check_omega(omega)
    by_qid = index_predictions(preds)
    gold_ids = {ex.question_id for ex in gold}

    requests: dict[JudgeRequest, None] = {}  # an ordered set
    plans = []
    for ex in gold:
        pred = by_qid.get(ex.question_id)
        replies = pred.replies if pred is not None else ()
        plans.append((ex, pred is not None, replies, _plan_example(ex, replies, requests)))

    results = resolve(list(requests), judge, cache, progress)

    examples = []
    for ex, has_pred, replies, span_plans in plans:
        span_results = []
        for index, (ans, planned) in enumerate(zip(ex.answers, span_plans)):
            scored, points = [], []
            n_dup = n_cand = n_unparsed = 0
            height: int | None = None
            for p in planned:
                raw = ""
                if p.score_request is not None:
                    j = results[p.score_request]
                    height, raw = j.score, j.raw
                    n_unparsed += j.score is None
                points.append((p.reply.time_s, height))
                duplicate: bool | None = None
                if p.candidate:
                    if p.exact_repeat:
                        duplicate = True
                    else:
                        d = results[p.duplicate_request]
                        duplicate = None if d.score is None else bool(d.score)
                        n_unparsed += d.score is None
                    if duplicate is not None:
                        n_cand += 1
                        n_dup += duplicate
                scored.append(ScoredReply(p.reply.time_s, p.reply.content, height, duplicate, raw))
            span_results.append(
                SpanResult(
                    answer_index=index,
                    span_s=ans.reply_timespan_s,
                    answer=ans.content,
                    replies=tuple(scored),
                    pauc=pauc_span(ans.reply_timespan_s, points, omega),
                    n_duplicates=n_dup,
                    n_duplicate_candidates=n_cand,
                    n_unparsed=n_unparsed,
                )
            )
        n_in = sum(any(in_span(r.time_s, a.reply_timespan_s) for a in ex.answers) for r in replies)
        examples.append(
            ExampleResult(ex.question_id, ex.subset, tuple(replies), tuple(span_results), n_in, ex.duration_s, has_pred)
        )

    subset_names = sorted({ex.subset for ex in examples})
    return EvalReport(
        judge_id=judge.id,
        omega=omega,
        examples=tuple(examples),
        subsets=tuple(summarise(name, [e for e in examples if e.subset == name]) for name in subset_names),
        overall=summarise("overall", examples),
        missing_predictions=tuple(ex.question_id for ex in gold if ex.question_id not in by_qid),
        unmatched_predictions=tuple(q for q in by_qid if q not in gold_ids),
    )


"""The offline judges on the synthetic benchmark's kind of answers (the strict one tested against wrong answers
first), and the OpenAI-compatible judge against a tiny fake server on 127.0.0.1 (timeouts, retries, unparseable
answers, refusals, the cache)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_duet.errors import UsageError
from edge_duet.eval.evaluator import evaluate
from edge_duet.eval.formats import GoldAnswer, GoldExample, Prediction, Reply
from edge_duet.eval.judge_cache import JudgeCache
from edge_duet.eval.judges import (
    Judgement,
    JudgeError,
    JudgeRequest,
    OpenAIJudge,
    OpenAIJudgeOptions,
    OverlapJudge,
    StrictJudge,
    make_judge,
    make_judges,
    parse_score,
    parse_yes_no,
)
from edge_duet.eval import benchmark as bm
from edge_duet.eval import facts, scenes
from edge_duet.eval.textnorm import content_tokens, key_category

# ------------------------------------------------------------------------------------------------ offline judge

GOLD = "A red circle appeared."


@pytest.mark.parametrize(
    "replies, expected",
    [
        (["A red circle appeared."], 2),
        (["a RED circle appears!"], 2),
        (["Red circle."], 2),  # colour and shape weigh double: 4 / 5 of the weight
        (["I see a red circle appearing on the screen."], 2),
        (["A circle appeared."], 1),  # the colour is missing
        (["A blue circle appeared."], 1),  # a conflicting colour: partly right
        (["Something appeared."], 0),  # no key word
        (["A green square appeared."], 0),
        ([], 0),
        (["A blue circle appeared.", "Sorry, a red circle."], 1),  # the wrong colour stays said
        (["red blue green yellow circle square triangle"], 1),  # listing everything is not an answer
    ],
)
def test_overlap_scores(replies, expected):
    assert OverlapJudge().score("Tell me when a shape appears.", GOLD, replies).score == expected


def test_overlap_numbers_and_question_words():
    judge = OverlapJudge()
    assert judge.score("How many?", "Two green triangles appeared.", ["2 green triangles"]).score == 2
    assert judge.score("How many?", "Two green triangles appeared.", ["Three green triangles"]).score == 1
    # words the question already says earn nothing: "cook" is in the question
    assert judge.score("What is the cook doing?", "The cook cracks eggs.", ["The cook is standing."]).score == 0
    assert judge.score("What is the cook doing?", "The cook cracks eggs.", ["She cracks two eggs."]).score == 2
    # an answer made of stop words only: exact text or nothing
    assert judge.score("Is it there?", "Yes.", ["yes"]).score == 2
    assert judge.score("Is it there?", "Yes.", ["no"]).score == 0


def test_overlap_duplicates():
    judge = OverlapJudge()
    assert judge.is_duplicate(["A red circle appeared."], "a red circle appeared").score == 1
    assert judge.is_duplicate(["A red circle appeared."], "The red circle.").score == 1
    assert judge.is_duplicate(["A red circle appeared."], "The red circle moved.").score == 0
    assert judge.is_duplicate(["A red circle appeared.", "It moved left."], "The red circle moved left.").score == 1
    assert judge.is_duplicate([], "A red circle.").score == 0
    assert judge.is_duplicate(["Okay."], "Yes.").score == 0


def test_text_normalisation():
    assert content_tokens("Circles appearing, MOVED; grey") == content_tokens("circle appears move gray")
    assert key_category(next(iter(content_tokens("two")))) == "number"
    assert "one" in content_tokens("the blue one")  # "one" stays a word, not the number 1
    assert key_category(next(iter(content_tokens("triangles")))) == "shape"


@pytest.mark.parametrize(
    "text, expected",
    [("2", 2), (" 1\n", 1), ("0.", 0), ("**2**", 2), ("Score: 1", 1), ("<think>maybe 0</think>2", 2),
     ("3", None), ("10", None), ("1.5", None), ("The answer is 2", None), ("", None), ("good", None)],
)  # fmt: skip
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_yes_no():
    assert parse_yes_no("Yes.") == 1 and parse_yes_no("no") == 0 and parse_yes_no("**NO**") == 0
    assert parse_yes_no("maybe") is None and parse_yes_no("yesterday") is None


def test_make_judge():
    assert isinstance(make_judge("overlap"), OverlapJudge)
    assert isinstance(make_judge(), StrictJudge) and make_judge("strict").id == "strict-v1"
    assert [j.id for j in make_judges("strict, overlap")] == ["strict-v1", "overlap-v2"]
    for bad in ("", "strict,strict", "strict,gpt-4"):
        with pytest.raises(UsageError):
            make_judges(bad)
    judge = make_judge("openai:Qwen/Qwen3-32B@http://127.0.0.1:8000/v1", timeout_s=5, max_workers=2)
    assert isinstance(judge, OpenAIJudge)
    assert judge.options.model == "Qwen/Qwen3-32B" and judge.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert judge.max_workers == 2 and judge.options.timeout_s == 5
    with pytest.raises(UsageError, match="openai:MODEL@"):
        make_judge("gpt-4.1")
    with pytest.raises(UsageError):
        make_judge("openai:gpt-4.1")


# ------------------------------------------------------------------------------------------------ strict judge
# Wrong answers first: each names one wrong fact and must score 0, whatever else it gets right.

STRICT = StrictJudge()


def strict(answer, *replies, question="Tell me when something happens."):
    return STRICT.score(question, answer, list(replies)).score


@pytest.mark.parametrize(
    "answer, reply",
    [
        ("A red star appeared.", "The red star left."),  # wrong event kind (overlap-v2 gave 2)
        ("The star turned blue.", "A blue star appeared."),  # wrong event kind (overlap-v2 gave 2)
        ("A red star appeared.", "The red star started moving."),
        ("The red star left.", "The red star moved to the left."),  # "the left" is a place, the kind is move
        ("The red star started moving.", "The star turned red."),
        ("A red star appeared.", "A blue star appeared."),  # wrong colour (overlap-v2 gave 1)
        ("A red star appeared.", "An orange star appeared."),  # a colour outside the benchmark is still a colour
        ("The star turned blue.", "The star turned red."),
        ("The star turned blue.", "The blue star turned red."),  # the new colour is what counts
        ("The star is red.", "The star is green."),
        ("A red star appeared.", "A red circle appeared."),  # wrong shape (overlap-v2 gave 1)
        ("A red star appeared.", "A red ball appeared."),
        ("The red object is a star.", "The red object is a triangle."),
        ("There are two objects.", "There are three objects."),  # wrong count
        ("There are two objects.", "There are 3 objects."),
        ("There is one object.", "There are zero objects."),
        ("There are zero objects.", "There is one object."),
        ("There are two objects.", "A red star appeared."),  # an event is not a count
        ("A red star appeared.", "No red star appeared."),  # negated
        ("A red star appeared.", "Nothing appeared."),
        ("A red star appeared.", "The red star did not appear."),
        ("A red star appeared.", "A red star and a blue circle appeared."),  # another object too
        ("The red star left.", "The red star left and a blue circle appeared."),
        ("A red star appeared.", "red blue green yellow purple circle square triangle star appeared"),  # listing
    ],
)  # fmt: skip
def test_strict_a_wrong_fact_scores_0(answer, reply):
    assert strict(answer, reply) == 0, STRICT.score("", answer, [reply]).raw


@pytest.mark.parametrize(
    "answer, reply",
    [
        ("A red star appeared.", "A red star appeared."),
        ("A red star appeared.", "I see a red star appearing."),
        ("A red star appeared.", "A red star has just entered the scene!"),
        ("A red star appeared.", "a RED STAR appears"),
        ("The red star left.", "The red star disappeared."),
        ("The red star left.", "I must reply.\nThe red star has left."),  # the must-reply prefix states nothing
        ("The star turned blue.", "The red star turned blue."),
        ("The star turned blue.", "The star changed colour to blue."),
        ("The star turned blue.", "The star changed from red to blue."),
        ("The red star started moving.", "The red star is moving."),
        ("The star is red.", "The star is red."),
        ("The star is red.", "It is a red star."),
        ("The red object is a star.", "The red object is a star."),
        ("There are two objects.", "2 objects are visible now."),
        ("There are zero objects.", "There are no objects."),
        ("There is one object.", "There is 1 object."),
        ("Two green triangles appeared.", "2 green triangles appeared."),
        ("A grey circle appeared.", "A gray disc appeared."),
    ],
)  # fmt: skip
def test_strict_a_correct_paraphrase_scores_2(answer, reply):
    assert strict(answer, reply) == 2, STRICT.score("", answer, [reply]).raw


def test_strict_partial_answers_score_1_and_empty_ones_0():
    assert strict("A red star appeared.", "A star appeared.") == 1  # colour missing
    assert strict("A red star appeared.", "Something red appeared.") == 1  # shape missing
    assert strict("A red star appeared.", "A red star.") == 1  # event kind missing
    assert strict("The red object is a star.", "It is a star.") == 1
    assert strict("A red star appeared.", "I cannot tell.") == 0  # no fact at all
    assert strict("A red star appeared.", "Hello there.") == 0
    assert strict("A red star appeared.") == 0


def test_strict_accumulated_replies():
    gold = "A red star appeared."
    assert strict(gold, "A star appeared.", "It is red.") == 2  # facts may come in two replies
    assert strict(gold, "A blue star appeared.", "Sorry, a red star appeared.") == 0  # a wrong reply stays said
    assert strict(gold, "A red star appeared.", "There are two objects.") == 0


def test_strict_never_takes_facts_from_the_question():
    # the question names the colour and shape: the reply must still say them (overlap-v2 gave these a 2)
    assert strict("The red star left.", "It left.", question="Tell me when the red star leaves.") == 1
    assert OverlapJudge().score("Tell me when the red star leaves.", "The red star left.", ["It left."]).score == 2
    assert strict("A blue square appeared.", "A blue appeared.", question="Tell me when a square appears.") == 1


def test_strict_in_a_multi_question_dialogue():
    """overlap-v2 removes the *first* question's words from every answer of the example: here "red", so "It is a
    star." was a full answer to "What shape is the red object?". The strict judge reads no question."""
    gold = [GoldExample("m", "Tell me when a red object appears.", (
        GoldAnswer("A red star appeared.", (4.0, 9.0)), GoldAnswer("The red object is a star.", (12.0, 14.0))))]
    preds = [Prediction("m", (Reply(6.0, "A red star appeared."), Reply(14.0, "It is a star.")))]
    heights = lambda judge: [s.replies[0].score for s in evaluate(gold, preds, judge).spans]  # noqa: E731
    assert heights(OverlapJudge()) == [2, 2]
    assert heights(StrictJudge()) == [2, 1]


def test_strict_answers_outside_the_benchmark_fall_back_to_content_words():
    assert strict("A donkey.", "I see a donkey.") == 2
    assert strict("The cook cracks eggs.", "The cook is standing.") == 1
    assert strict("The cook cracks eggs.", "Nothing.") == 0
    assert strict("Yes.", "yes") == 2 and strict("Yes.", "no") == 0


def test_strict_duplicates():
    dup = lambda earlier, reply: STRICT.is_duplicate(earlier, reply).score  # noqa: E731
    assert dup(["A red star appeared."], "a red star appeared") == 1
    assert dup(["A red star appeared."], "The red star.") == 1  # says nothing new
    assert dup(["A red star appeared."], "The red star left.") == 0
    assert dup(["A red star appeared."], "A blue star appeared.") == 0
    assert dup(["There are two objects."], "There are three objects.") == 0
    assert dup(["The red star left.", "There are two objects."], "The red star left. There are two objects.") == 1
    assert dup([], "A red star.") == 0
    assert dup(["Okay."], "Okay.") == 1 and dup(["Okay."], "Fine.") == 0  # no facts: the overlap rule


def test_facts_read_every_sentence_the_generator_writes():
    """One vocabulary: each answer template, with each colour and shape of the scenes, reads back as its facts."""
    kinds_of = {bm.A_WHAT_COLOUR: set(), bm.A_WHAT_SHAPE: set()} | {t: {k} for k, t in bm.EVENT_ANSWERS.items()}
    for template, kinds in kinds_of.items():
        for colour in scenes.COLOUR_NAMES:
            for shape in scenes.SHAPES:
                text = template.format(colour=colour, shape=shape)
                assert facts.claims(text) == [facts.Claim(frozenset(kinds), frozenset({colour}), frozenset({shape}))]
    for n in range(len(bm.NUMBERS)):
        assert facts.claims(bm.a_count(n)) == [facts.Claim(frozenset({facts.COUNT_KIND}), count=n)]
    assert set(facts.KIND_WORDS) == set(bm.EVENT_KINDS)
    assert set(scenes.COLOUR_NAMES) <= facts.COLOURS and set(scenes.SHAPES) <= facts.SHAPES


def test_every_gold_answer_of_a_split_scores_2_against_itself_and_0_against_another_kind():
    """The judge on a whole generated split: each gold answer is a correct reply to itself, and the same object
    with another event kind is a wrong one."""
    for ex in bm.sample_examples(31, 24):
        for a in ex.answers:
            assert strict(a.text, a.text) == 2, a.text
            (claim,) = facts.claims(a.text)
            for kind in set(bm.EVENT_KINDS) - claim.kinds if claim.kinds - {facts.COUNT_KIND} else ():
                other = bm.EVENT_ANSWERS[kind].format(colour=next(iter(claim.colours)), shape=next(iter(claim.shapes)))
                assert strict(a.text, other) == 0, (a.text, other)


# ------------------------------------------------------------------------------------------------ fake server


class FakeOpenAI:
    """A chat-completions endpoint on 127.0.0.1 whose answers come from ``respond(request_json, call_index)``,
    which returns a dict: {"content": str} or {"status": int, "body": str}, optionally with "delay_s"."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    index = len(fake.requests)
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                answer = fake.respond(body, index)
                time.sleep(answer.get("delay_s", 0))
                if "status" in answer:
                    payload, status = answer.get("body", "error").encode(), answer["status"]
                else:
                    payload = json.dumps(
                        {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer["content"]}}]}
                    ).encode()
                    status = 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def judge_for(server, **kw) -> OpenAIJudge:
    opts = dict(model="fake-judge", base_url=server.url, timeout_s=2.0, max_retries=2, backoff_s=0.01, max_workers=1)
    opts.update(kw)
    return OpenAIJudge(OpenAIJudgeOptions(**opts))


def test_openai_judge_scores_and_sends_the_rubric(monkeypatch):
    monkeypatch.setenv("EDGE_DUET_JUDGE_API_KEY", "sk-test")
    with FakeOpenAI(lambda body, i: {"content": "2"}) as server:
        judge = judge_for(server)
        assert judge.score("What appears?", GOLD, ["A red", "circle."]) == Judgement(2, "2")
    body = server.requests[0]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0
    assert "0, 1 or 2" in body["messages"][0]["content"]
    assert "Reference answer: A red circle appeared." in user_text(body)
    assert "Assistant replies: A red circle." in user_text(body)  # the accumulated replies, in order
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_openai_judge_reports_unparseable_answers():
    with FakeOpenAI(lambda body, i: {"content": "The replies are quite good."}) as server:
        judge = judge_for(server)
        assert judge.score("q", GOLD, ["x"]) == Judgement(None, "The replies are quite good.")
        assert judge.is_duplicate(["x"], "y").score is None
    assert len(server.requests) == 2  # an unparseable answer is not retried


def test_openai_judge_duplicate_question():
    with FakeOpenAI(lambda body, i: {"content": "yes" if "New reply: again" in user_text(body) else "no"}) as server:
        judge = judge_for(server)
        assert judge.is_duplicate(["A red circle."], "again").score == 1
        assert judge.is_duplicate(["A red circle."], "A blue square.").score == 0


def test_openai_judge_retries_after_a_timeout():
    # the first request hangs past the client's timeout, the retry is answered
    with FakeOpenAI(lambda body, i: {"content": "1", "delay_s": 1.0 if i == 0 else 0}) as server:
        judge = judge_for(server, timeout_s=0.3)
        start = time.monotonic()
        assert judge.score("q", GOLD, ["x"]).score == 1
        assert time.monotonic() - start < 2.0
    assert len(server.requests) == 2


def test_openai_judge_gives_up_after_repeated_timeouts():
    with FakeOpenAI(lambda body, i: {"content": "1", "delay_s": 1.0}) as server:
        judge = judge_for(server, timeout_s=0.2, max_retries=1)
        with pytest.raises(JudgeError, match=r"failed 2 times \(last: timed out"):
            judge.score("q", GOLD, ["x"])
    assert len(server.requests) == 2


def test_openai_judge_retries_server_errors_but_not_refusals():
    with FakeOpenAI(lambda body, i: {"status": 503, "body": "busy"} if i < 2 else {"content": "0"}) as server:
        assert judge_for(server).score("q", GOLD, ["x"]).score == 0
    assert len(server.requests) == 3
    with FakeOpenAI(lambda body, i: {"status": 401, "body": "bad key"}) as server:
        with pytest.raises(JudgeError, match="EDGE_DUET_JUDGE_API_KEY"):
            judge_for(server).score("q", GOLD, ["x"])
    assert len(server.requests) == 1
    with FakeOpenAI(lambda body, i: {"status": 200, "body": "<html>not an API</html>"}) as server:
        with pytest.raises(JudgeError, match="OpenAI chat completion"):
            judge_for(server).score("q", GOLD, ["x"])


def test_openai_judge_unreachable():
    with FakeOpenAI(lambda body, i: {"content": "2"}) as server:
        url = server.url
    judge = OpenAIJudge(OpenAIJudgeOptions("m", url, timeout_s=0.5, max_retries=1, backoff_s=0.01))
    with pytest.raises(JudgeError, match="failed 2 times"):
        judge.score("q", GOLD, ["x"])


# ------------------------------------------------------------------------------------------------ with evaluate()


def scripted(body, i):
    text = user_text(body)
    if text.startswith("Earlier replies:"):
        return {"content": "no"}
    if "Assistant replies: I cannot tell" in text:
        return {"content": "Hmm, hard to say."}
    return {"content": "2" if "red circle" in text.split("Assistant replies:")[1] else "0"}


def test_evaluate_with_the_llm_judge_caches_and_counts_unparsed(tmp_path):
    gold = [
        GoldExample("a", "What appears?", (GoldAnswer(GOLD, (0.0, 10.0)),), "web"),
        GoldExample("b", "What appears?", (GoldAnswer(GOLD, (0.0, 10.0)),), "web"),
    ]
    preds = [
        Prediction("a", (Reply(2.0, "A red circle appeared."), Reply(4.0, "It is big."))),
        Prediction("b", (Reply(5.0, "I cannot tell"),)),
    ]
    with FakeOpenAI(scripted) as server:
        judge = judge_for(server, max_workers=3)
        with JudgeCache(tmp_path / "cache.sqlite") as cache:
            first = evaluate(gold, preds, judge, omega=0, cache=cache)
            n_calls = len(server.requests)
            assert n_calls == 4  # a: 2 scores + 1 duplicate check; b: 1 score
            assert len(cache) == 3  # the unparseable answer is not cached
            second = evaluate(gold, preds, judge, omega=0, cache=cache)
            assert len(server.requests) == n_calls + 1  # only the unparsed one is asked again
    assert first.to_dict() == second.to_dict()
    assert first.overall.n_unparsed == 1
    a, b = first.examples
    assert a.spans[0].pauc == pytest.approx((2 * 0.5 + 8 * 2) / 20)
    assert b.spans[0].pauc == pytest.approx(0.25)  # the unparsed judgement adds no step
    assert b.spans[0].replies[0].score is None and b.spans[0].replies[0].judge_raw == "Hmm, hard to say."


def test_cache_keys_include_the_judge():
    request = JudgeRequest("score", "q", "answer", ("r",))
    with JudgeCache(":memory:") as cache:
        cache.put("judge-a", request, Judgement(2, "2"))
        cache.put("judge-a", JudgeRequest("score", "q", "answer", ("r", "s")), Judgement(None, "??"))
        assert cache.get("judge-a", request) == Judgement(2, "2")
        assert cache.get("judge-b", request) is None
        assert len(cache) == 1


def test_overlap_a_wrong_key_word_named_by_the_question_still_conflicts():
    """The question's words earn nothing, but saying another shape than the answer's (which the question named)
    is still wrong: overlap-v1 gave this reply a 2."""
    judge = OverlapJudge()
    q = "Tell me when a square appears."
    assert judge.score(q, "A blue square appeared.", ["A blue square appeared."]).score == 2
    assert judge.score(q, "A blue square appeared.", ["A blue appeared."]).score == 2  # the question said square
    assert judge.score(q, "A blue square appeared.", ["A blue circle appeared."]).score == 1
    assert judge.score(q, "A blue square appeared.", ["A red circle appeared."]).score == 0

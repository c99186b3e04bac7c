"""Parity of runtime.chat with transformers' apply_chat_template + the Qwen processor's image-pad expansion."""

from __future__ import annotations

import pytest
from tokenizers import Regex, pre_tokenizers

from edge_duet.errors import InputError
from edge_duet.export.tokenizer import CHAT_TEMPLATE, build_tokenizer, default_corpus
from edge_duet.manifest import TokenSpec
from edge_duet.runtime.chat import ChatRenderer, ImagePiece, TextPiece, num_tokens, render_ids

transformers = pytest.importorskip("transformers")

MERGE = 2
MUST = "I must reply.\n"
SYSTEM = "You watch a live video. If the frames cannot answer the question, output NO REPLY."
# Qwen2's own pre-tokenizer regex: unlike GPT-2's it glues runs of newlines ("\n\n") into one pre-token.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EXTRA_CORPUS = [
    "Café crème, naïve façade, déjà vu. Grüße aus Köln! Ελληνικά, русский текст, 日本語のテキスト 🙂🎥",
    "Line one.\n\nLine two.\n\n\nLine three.\n  indented line\n",
    "The sign on the door says NO REPLY in big letters.",
] * 5


def make_tokenizer(kind: str):
    tok = build_tokenizer(default_corpus() + EXTRA_CORPUS)
    if kind == "qwen-regex":
        # Same vocabulary, Qwen2's pre-tokenization: the one real checkpoints ship.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return tok


@pytest.fixture(scope="module", params=["export", "qwen-regex"])
def setup(request):
    tok = make_tokenizer(request.param)
    ids = {name: tok.token_to_id(f"<|{name}|>") for name in
           ["im_start", "im_end", "vision_start", "vision_end", "image_pad", "video_pad", "endoftext"]}
    spec = TokenSpec(**ids, eos_ids=(ids["im_end"], ids["endoftext"]))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.chat_template = CHAT_TEMPLATE
    return ChatRenderer(tok, spec, merge_size=MERGE), hf


def reference_ids(hf, messages, grids, add_generation_prompt=False, prefill=""):
    """What the Qwen2-VL processor feeds the model: template text, each <|image_pad|> repeated t*gh*gw/merge^2."""
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) + prefill
    pad = "<|image_pad|>"
    assert text.count(pad) == len(grids)
    for t, gh, gw in grids:  # in order, through a placeholder, as Qwen2VLProcessor does
        text = text.replace(pad, "<|placeholder|>" * (t * gh * gw // MERGE**2), 1)
    text = text.replace("<|placeholder|>", pad)
    return hf.encode(text, add_special_tokens=False)


def user_msg(n_images, text=None):
    content = [{"type": "image"} for _ in range(n_images)]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def render_dialogue(r: ChatRenderer, system, turns, open_turn=None):
    """turns: (grids, user text, reply text, prefill); the reply is "generated" ids appended as they are."""
    pieces = r.system(system) if system is not None else r.system()
    for grids, text, reply, prefill in turns:
        pieces += r.user(grids, text)
        pieces += r.assistant_start(prefill)
        pieces.append(TextPiece(tuple(r.text_ids(reply))))
        pieces += r.assistant_end()
    if open_turn is not None:
        grids, text, prefill = open_turn
        pieces += r.user(grids, text)
        pieces += r.assistant_start(prefill)
    return pieces


def messages_of(system, turns, open_turn=None):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    all_grids = []
    for grids, text, reply, prefill in turns:
        msgs.append(user_msg(len(grids), text))
        msgs.append({"role": "assistant", "content": (prefill or "") + reply})
        all_grids += grids
    if open_turn is not None:
        msgs.append(user_msg(len(open_turn[0]), open_turn[1]))
        all_grids += open_turn[0]
    return msgs, all_grids


A, B, C = (1, 16, 20), (1, 8, 12), (1, 10, 36)
DIALOGUES = {
    "multi-turn": (
        SYSTEM,
        [
            ([A, B], "What is the cook doing?", "NO REPLY", None),
            ([A, A], None, "She is cracking two eggs into a bowl.", None),
            ([C], "Subtitle: «Café crème» — naïve 日本語 🙂", "NO REPLY", None),
            ([B, C], "Read the sign.", "The sign says NO REPLY, in red.", MUST),
            ([A], "", "NO REPLY", None),
        ],
        ([A, B], None, None),
    ),
    "default-system-and-must-reply-open": (None, [([B], "Hi", "NO REPLY", None)], ([C, C], "Now?", MUST)),
    "text-only-turns-and-newlines": (
        "\n\nLeading newlines in the prompt.\n",
        [([], "\n\nA question after blank lines?\n", "Line one.\n\nLine two.", None), ([], "  spaced", " x", None)],
        ([], "\n  \nwhat?", None),
    ),
    "unicode-system": ("Grüße 🙂 — réponds «NO REPLY» sinon.", [([A], "日本語?", "はい。", MUST)], None),
}


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_dialogue_ids_match_reference(setup, name):
    r, hf = setup
    system, turns, open_turn = DIALOGUES[name]
    msgs, grids = messages_of(system, turns, open_turn)
    prefill = (open_turn[2] or "") if open_turn else ""
    want = reference_ids(hf, msgs, grids, add_generation_prompt=open_turn is not None, prefill=prefill)
    pieces = render_dialogue(r, system, turns, open_turn)
    assert render_ids(pieces) == want
    assert num_tokens(pieces) == len(want)


def test_every_prefix_of_a_dialogue_matches(setup):
    # The runtime renders turn by turn: each turn's ids must extend the previous ones unchanged.
    r, hf = setup
    system, turns, _ = DIALOGUES["multi-turn"]
    for k in range(len(turns) + 1):
        msgs, grids = messages_of(system, turns[:k])
        assert render_ids(render_dialogue(r, system, turns[:k])) == reference_ids(hf, msgs, grids)


def test_user_turn_structure(setup):
    r, _ = setup
    t = r.tokens
    pieces = r.user([A, B], "What now?")
    kinds = [type(p).__name__ for p in pieces]
    assert kinds == ["TextPiece", "ImagePiece", "TextPiece", "ImagePiece", "TextPiece"]
    assert pieces[0].ids[0] == t.im_start and pieces[0].ids[-1] == t.vision_start
    assert pieces[1] == ImagePiece(A, 16 * 20 // 4, t.image_pad)
    assert pieces[2].ids == (t.vision_end, t.vision_start)
    assert pieces[3].grid_thw == B and pieces[3].num_tokens == 8 * 12 // 4
    assert pieces[4].ids[0] == t.vision_end
    assert t.im_end in pieces[4].ids and pieces[4].ids[-1] != t.im_end  # "<|im_end|>" then "\n"


def test_fixed_strings_use_special_ids(setup):
    r, _ = setup
    t = r.tokens
    (sys_piece,) = r.system("Hello")
    assert sys_piece.ids[0] == t.im_start
    assert sys_piece.ids[-len(r.text_ids("\n")) - 1] == t.im_end
    (start,) = r.assistant_start()
    assert start.ids == (t.im_start, *r.text_ids("assistant\n"))
    (end,) = r.assistant_end()
    assert end.ids == (t.im_end, *r.text_ids("\n"))
    # No special id leaks out of plain text, and the literal "NO REPLY" is ordinary text.
    specials = {t.im_start, t.im_end, t.vision_start, t.vision_end, t.image_pad, t.video_pad, t.endoftext}
    assert not specials & set(r.text_ids("NO REPLY and more"))


def test_must_reply_prefill_ids(setup):
    r, hf = setup
    (start,) = r.assistant_start(MUST)
    assert list(start.ids) == hf.encode("<|im_start|>assistant\n" + MUST, add_special_tokens=False)


def test_generated_ids_are_kept_verbatim(setup):
    # Ids a model sampled need not be the canonical encoding of their text; the renderer never touches them.
    r, _ = setup
    odd = [r.text_ids("N")[0], r.text_ids("O")[0], r.text_ids(" REPLY")[0]]
    pieces = r.assistant_start() + [TextPiece(tuple(odd))] + r.assistant_end()
    ids = render_ids(pieces)
    n = len(r.assistant_start()[0].ids)
    assert ids[n:n + 3] == odd


@pytest.mark.parametrize("grid", [(1, 15, 20), (1, 0, 4), (0, 4, 4), (1, 1, 2)])
def test_invalid_grid_is_input_error(setup, grid):
    r, _ = setup
    with pytest.raises(InputError, match="grid"):
        r.user([grid])

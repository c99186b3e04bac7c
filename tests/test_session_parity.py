"""The incremental session against transformers' full recompute, turn by turn, over long dialogues.

The reference re-runs the whole dialogue so far for every generated token (positions from ``get_rope_index``
on the whole sequence). The session prefills only new tokens, confirms silence from the next turn's prefill,
and rolls back when the model would not have finished ``NO REPLY``. Token ids must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from chatty import dialogue_script, make_chatty_checkpoint  # noqa: E402

from edge_duet.export.checkpoint import load_model  # noqa: E402
from edge_duet.export.onnx_export import ExportOptions, export_bundle  # noqa: E402
from edge_duet.export.reference import TorchReference  # noqa: E402
from edge_duet.runtime.chat import render_ids  # noqa: E402
from edge_duet.runtime.events import Reply, Silence, TurnStats  # noqa: E402
from edge_duet.runtime.preprocess import preprocess_frame  # noqa: E402
from edge_duet.runtime.session import Session, SessionOptions  # noqa: E402

MAX_NEW = 6
TURNS = 32


@pytest.fixture(scope="module")
def chatty(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chatty")
    ckpt = make_chatty_checkpoint(root / "ckpt")
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(), log=lambda s: None)
    return ckpt, bundle


def script(seed: int, turns: int = TURNS):
    return dialogue_script(seed, turns)


def run_session(bundle: Path, dialogue, **opts):
    s = Session(bundle, SessionOptions(max_new_tokens=MAX_NEW, **opts))
    events = []
    for frames, q, must, t in dialogue:
        if q:
            s.ask(q, must_reply=must)
        s.add_frames(frames, t=t, channels="rgb")
        events += list(s.step())
    events += list(s.finish())
    return s, events


_REFERENCE: dict = {}  # the transformers side is the slow one: computed once per (checkpoint, dialogue)


def run_reference(ckpt: Path, session: Session, dialogue):
    key = (str(ckpt), repr([(q, must, t) for _, q, must, t in dialogue]), hash(b"".join(f.tobytes() for fr, *_ in dialogue for f in fr)))
    if key not in _REFERENCE:
        _REFERENCE[key] = _run_reference(ckpt, session, dialogue)
    return _REFERENCE[key]


def _run_reference(ckpt: Path, session: Session, dialogue):
    model, _ = load_model(ckpt)
    m = session.manifest
    r = session.renderer
    ref = TorchReference(model, m.tokens.image_pad)
    nl = list(r.assistant_end()[0].ids[1:])
    ids = render_ids(r.system(session.system_prompt))
    frames, outputs, key = [], [], 0
    for fr, q, must, _ in dialogue:
        pre = [preprocess_frame(f, m.preprocess, channels="rgb") for f in fr]
        for p, g in pre:
            frames.append((key, p, g))
            key += 1
        ids += render_ids(r.user([g for _, g in pre], q))
        ids += render_ids(r.assistant_start(m.prompt.must_reply_prefix if must else None))
        gen, stop = ref.greedy(ids, frames, MAX_NEW, list(m.tokens.eos_ids))
        closing = ([stop] if stop is not None else []) + ([m.tokens.im_end] if stop != m.tokens.im_end else [])
        ids += gen + closing + nl
        outputs.append(gen)
    return ids, outputs


@pytest.mark.parametrize("decoder", ["plain", "fused"])
def test_incremental_session_equals_full_recompute(chatty, decoder):
    ckpt, bundle = chatty
    dialogue = script(seed=3)
    session, events = run_session(bundle, dialogue, decoder=decoder)
    assert session.engine.flavour == decoder
    ref_ids, ref_outputs = run_reference(ckpt, session, dialogue)
    assert session.dialogue_ids() == ref_ids

    no_reply = session.renderer.text_ids("NO REPLY")
    ref_replies = {k for k, gen in enumerate(ref_outputs) if gen != no_reply and gen}
    replies = {e.turn: e for e in events if isinstance(e, Reply)}
    assert set(replies) == ref_replies
    for k, e in replies.items():
        assert list(e.token_ids) == ref_outputs[k]

    # Both speculation outcomes were exercised: confirmed silences and roll-backs into a reply.
    silences = [e.turn for e in events if isinstance(e, Silence)]
    rolled_back = set(silences) & set(replies)
    confirmed = set(silences) - set(replies)
    assert len(confirmed) >= 3, f"too few confirmed silences to test: {sorted(confirmed)}"
    assert len(rolled_back) >= 3, f"too few roll-backs to test: {sorted(rolled_back)}"


@pytest.mark.parametrize("decoder", ["plain", "fused"])
def test_silent_turn_costs_one_decoder_call(chatty, decoder):
    _, bundle = chatty
    _, events = run_session(bundle, script(seed=3), decoder=decoder)
    by_turn: dict[int, list] = {}
    for e in events:
        by_turn.setdefault(e.turn, []).append(e)
    stats = {e.turn: e for e in events if isinstance(e, TurnStats)}
    checked = 0
    for turn, st in stats.items():
        # events emitted while this turn was processed: a late reply of turn-1 adds calls to this turn
        late_reply = any(isinstance(e, Reply) for e in by_turn.get(turn - 1, [])) and \
            any(isinstance(e, Silence) for e in by_turn.get(turn - 1, []))
        silent_now = any(isinstance(e, Silence) for e in by_turn[turn])
        if silent_now and not late_reply:
            assert st.decoder_calls == 1, (turn, st)
            checked += 1
    assert checked >= 3


def test_without_speculation_same_dialogue_more_calls(chatty):
    _, bundle = chatty
    dialogue = script(seed=5, turns=20)
    fast, _ = run_session(bundle, dialogue)
    slow, _ = run_session(bundle, dialogue, speculate_silence=False)
    assert fast.dialogue_ids() == slow.dialogue_ids()
    assert fast.decoder_calls_total < slow.decoder_calls_total

"""Session behaviour beyond parity: inputs, token drop, eviction, cancel, providers, infer."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_duet.apps.cli import app
from edge_duet.errors import BundleError, InputError, ProviderError, UsageError
from edge_duet.runtime.events import Evicted, Reply, Silence, TokenDelta, TurnStarted, TurnStats
from edge_duet.runtime.session import Session, SessionOptions

runner = CliRunner()


def scene(k: int, moving: bool = True, size=(84, 112)) -> np.ndarray:
    img = np.full((*size, 3), 30, dtype=np.uint8)
    x = (k * 6) % (size[1] - 20) if moving else 10
    img[30:50, x:x + 20] = (40, 200, 60)
    return img


def test_events_of_a_turn(tiny_bundle):
    s = Session(tiny_bundle, SessionOptions(max_new_tokens=5))
    s.ask("What is it?", must_reply=True)
    s.add_frames([scene(0), scene(1)], t=2.0)
    events = list(s.step())
    assert isinstance(events[0], TurnStarted) and events[0].must_reply and events[0].n_frames == 2
    assert isinstance(events[-1], TurnStats) and events[-1].turn == 0
    final = [e for e in events if isinstance(e, (Reply, Silence))]
    assert len(final) == 1 and final[0].t == 2.0
    if isinstance(final[0], Reply):
        deltas = "".join(e.text for e in events if isinstance(e, TokenDelta))
        assert deltas == final[0].text
        assert len(final[0].token_ids) <= 5
    # the must-reply prefill is in the dialogue
    prefix = s.renderer.text_ids(s.manifest.prompt.must_reply_prefix)
    ids = s.dialogue_ids()
    assert any(ids[i:i + len(prefix)] == prefix for i in range(len(ids)))
    assert json.loads(json.dumps(events[-1].to_dict()))["event"] == "stats"


def test_nothing_to_do_and_bad_inputs(tiny_bundle):
    s = Session(tiny_bundle)
    assert list(s.step()) == []
    with pytest.raises(InputError):
        s.ask("   ")
    with pytest.raises(InputError):
        s.add_frames([np.zeros((10, 10), dtype=np.uint8)], t=1.0)
    with pytest.raises(InputError):
        s.add_frames([np.zeros((10, 10, 3), dtype=np.float32)], t=1.0)
    with pytest.raises(UsageError):
        Session(tiny_bundle, SessionOptions(max_new_tokens=0))


def test_reset_forgets_the_dialogue(tiny_bundle):
    s = Session(tiny_bundle, SessionOptions(max_new_tokens=3))
    s.add_frames([scene(0)], t=1.0)
    list(s.step())
    first = s.dialogue_ids()
    s.reset()
    assert s.context_tokens < len(first) and s.turn == 0
    s.add_frames([scene(0)], t=1.0)
    list(s.step())
    assert s.dialogue_ids() == first  # same input, same output: nothing leaked across the reset


def test_token_drop_keeps_positions_and_drops_static_tokens(tiny_bundle):
    s = Session(tiny_bundle, SessionOptions(max_new_tokens=2, token_drop_threshold=0.98))
    s.add_frames([scene(0, moving=False), scene(1, moving=False)], t=1.0)
    stats = [e for e in s.step() if isinstance(e, TurnStats)][0]
    # the second frame is identical to the first: all but one of its tokens go
    per_frame = stats.visual_tokens_kept + stats.visual_tokens_dropped
    assert stats.visual_tokens_dropped == per_frame // 2 - 1
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in range(2)]
    s.add_frames(noise, t=2.0)
    stats = [e for e in s.step() if isinstance(e, TurnStats)][0]
    assert stats.visual_tokens_dropped < per_frame // 2  # frames that changed keep most tokens
    off = Session(tiny_bundle, SessionOptions(max_new_tokens=2))
    off.add_frames([scene(0, moving=False), scene(1, moving=False)], t=1.0)
    assert [e for e in off.step() if isinstance(e, TurnStats)][0].visual_tokens_dropped == 0


@pytest.mark.parametrize("decoder", ["plain", "fused"])
def test_eviction_keeps_system_and_question_and_equals_fresh_window(tiny_bundle, decoder):
    s = Session(tiny_bundle, SessionOptions(max_new_tokens=3, max_context_tokens=420, decoder=decoder))
    s.ask("Where is the green box?")
    evicted = []
    for k in range(25):
        s.add_frames([scene(2 * k), scene(2 * k + 1)], t=float(k))
        evicted += [e for e in s.step() if isinstance(e, Evicted)]
        assert s.context_tokens <= 420
    assert evicted, "the context never filled"
    assert s.segments[0].role == "system"
    assert any(seg.question == "Where is the green box?" for seg in s.segments)
    # after eviction the cache is exactly a fresh prefill of the kept window (positions re-anchored at 0)
    from edge_duet.runtime.context import assemble

    chunks = [c for seg in s.segments for c in seg.chunks]
    cached = s.cache.length
    emb, pos, _ = assemble(s.engine, chunks, 0)
    _, fresh = s.engine.decode(emb[:cached], pos[:, :cached], s.engine.empty_cache(cached))
    for (k1, v1), (k2, v2) in zip(s.cache.host_layers(), fresh.host_layers()):
        np.testing.assert_allclose(k1, k2, atol=1e-4)
        np.testing.assert_allclose(v1, v2, atol=1e-4)


def test_a_turn_too_big_for_the_context_is_a_clear_error(tiny_bundle):
    s = Session(tiny_bundle, SessionOptions(max_context_tokens=64))
    s.add_frames([scene(0), scene(1)], t=1.0)
    with pytest.raises(UsageError, match="raise `max_context_tokens`"):
        list(s.step())


def test_cancel_ends_the_reply(tiny_bundle):
    s = Session(tiny_bundle, SessionOptions(max_new_tokens=50))
    s.ask("Describe everything.", must_reply=True)
    s.add_frames([scene(0)], t=1.0)
    tokens = 0
    for ev in s.step():
        if isinstance(ev, TokenDelta):
            tokens += 1
            threading.Thread(target=s.cancel).start()
            threading.Event().wait(0.05)
        if isinstance(ev, Reply):
            assert len(ev.token_ids) <= 2
    # the next turn works normally
    s.add_frames([scene(1)], t=2.0)
    assert any(isinstance(e, TurnStats) for e in s.step())


def test_providers_are_checked(tiny_bundle):
    with pytest.raises(ProviderError, match="unknown provider"):
        Session(tiny_bundle, SessionOptions(providers="npu"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderError, match="not available"):
            Session(tiny_bundle, SessionOptions(providers="cuda"))
    assert Session(tiny_bundle, SessionOptions(providers="cpu")).engine.providers == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------ edge-duet infer


def write_examples(tmp_path, n_turns=4):
    frames = []
    for k in range(2 * n_turns):
        p = tmp_path / f"f{k}.png"
        Image.fromarray(scene(k)[:, :, ::-1]).save(p)
        frames.append(p.name)
    conv = [{"role": "system", "content": "Watch closely."}]
    for t in range(n_turns):
        content = [{"type": "image", "image": frames[2 * t]}, {"type": "image", "image": frames[2 * t + 1]}]
        if t == 1:
            content.append({"type": "text", "text": "What do you see?"})
        conv.append({"role": "user", "content": content, "time": 2.0 * (t + 1), "must_reply": t == 1})
    data = [{"question_id": "a", "conversation": conv}, {"question_id": "b", "conversation": conv[1:3]}]
    path = tmp_path / "input.json"
    path.write_text(json.dumps(data))
    return path


def test_infer_writes_responses(tmp_path, tiny_bundle):
    inp = write_examples(tmp_path)
    out = tmp_path / "pred.jsonl"
    res = runner.invoke(app, ["infer", str(inp), "-o", str(out), "--model", str(tiny_bundle), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["question_id"] for x in lines] == ["a", "b"]
    resp = lines[0]["model_response_list"]
    assert {"role": "user", "content": "What do you see?", "time": 4.0} in resp
    # one user entry per input turn, "" when it brought frames only (the evaluator takes turn times from them)
    assert [r["time"] for r in resp if r["role"] == "user"] == [2.0, 4.0, 6.0, 8.0]
    assert [r["content"] for r in resp if r["role"] == "user"] == ["", "What do you see?", "", ""]
    assert all(r["content"].strip() != "NO REPLY" for r in resp)
    times = [r["time"] for r in resp]
    assert times == sorted(times)
    # the must-reply turn answers
    assert any(r["role"] == "assistant" and r["time"] == 4.0 for r in resp)


def test_infer_errors(tmp_path, tiny_bundle):
    out = tmp_path / "o.jsonl"
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    res = runner.invoke(app, ["infer", str(bad), "-o", str(out), "--model", str(tiny_bundle)])
    assert res.exit_code == InputError.exit_code and "not valid JSON" in res.output
    inp = write_examples(tmp_path)
    (tmp_path / "f3.png").unlink()
    res = runner.invoke(app, ["infer", str(inp), "-o", str(out), "--model", str(tiny_bundle)])
    assert res.exit_code == InputError.exit_code and "f3.png does not exist" in res.output
    (tmp_path / "f3.png").write_bytes(b"not a png")
    res = runner.invoke(app, ["infer", str(inp), "-o", str(out), "--model", str(tiny_bundle)])
    assert res.exit_code == InputError.exit_code and "cannot read image" in res.output
    res = runner.invoke(app, ["infer", str(inp), "-o", str(out), "--model", str(tmp_path / "nobundle")])
    assert res.exit_code == BundleError.exit_code and "edge-duet export" in res.output
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps([{"question_id": "x", "conversation": [{"role": "user", "content": []}]}]))
    res = runner.invoke(app, ["infer", str(nested), "-o", str(out), "--model", str(tiny_bundle)])
    assert res.exit_code == InputError.exit_code and "'time'" in res.output


def test_decoder_flavours_agree_and_the_fused_cache_is_allocated_once(tiny_bundle):
    from edge_duet.runtime.engine import FusedKVCache

    fused = Session(tiny_bundle, SessionOptions(max_new_tokens=4, max_context_tokens=512))
    plain = Session(tiny_bundle, SessionOptions(max_new_tokens=4, max_context_tokens=512, decoder="plain"))
    assert (fused.engine.flavour, plain.engine.flavour) == ("fused", "plain")  # auto: fused on the CPU
    assert isinstance(fused.cache, FusedKVCache) and fused.cache.capacity == 512
    buffers, nbytes = fused.cache.buffers, fused.cache.nbytes
    for k in range(4):
        if k == 1:
            for s in (fused, plain):
                s.ask("What is it?", must_reply=True)
        for s in (fused, plain):
            s.add_frames([scene(2 * k), scene(2 * k + 1)], t=float(k))
            list(s.step())
    assert fused.dialogue_ids() == plain.dialogue_ids()
    assert fused.context_tokens == plain.context_tokens and fused.next_pos == plain.next_pos
    for (k1, v1), (k2, v2) in zip(fused.cache.host_layers(), plain.cache.host_layers()):
        np.testing.assert_allclose(k1, k2, atol=1e-4)
        np.testing.assert_allclose(v1, v2, atol=1e-4)
    assert fused.cache.buffers is buffers and fused.cache.nbytes == nbytes  # written in place, never regrown
    fused.reset()
    assert fused.cache.length == 0 and fused.cache.buffers is buffers


def test_a_bundle_without_the_fused_decoder_runs_plain(tiny_bundle, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["graphs"]["decoder_fused"]  # what an export before the fused flavour wrote
    (old / "manifest.json").write_text(json.dumps(manifest))
    s = Session(old, SessionOptions(max_new_tokens=2))
    assert s.engine.flavour == "plain"
    s.add_frames([scene(0)], t=1.0)
    assert any(isinstance(e, TurnStats) for e in s.step())
    with pytest.raises(BundleError, match="no fused decoder.*`decoder` to plain"):
        Session(old, SessionOptions(decoder="fused"))
    with pytest.raises(UsageError, match="unknown decoder flavour"):
        Session(tiny_bundle, SessionOptions(decoder="fast"))


@pytest.mark.parametrize("decoder", ["plain", "fused"])
def test_smooth_eviction_equals_eviction_in_one_turn(tiny_bundle, decoder):
    # the kept window prefilled a few segments per turn beside the live cache, swapped in at the eviction: the
    # same dialogue, replies and evictions as re-prefilling it all in the evicting turn
    runs = {}
    for smooth in (False, True):
        s = Session(tiny_bundle, SessionOptions(max_new_tokens=3, max_context_tokens=420, decoder=decoder,
                                                smooth_eviction=smooth))
        events = []
        for k in range(40):
            if k % 9 == 4:
                s.ask("Where is the green box?", must_reply=k % 2 == 0)
            s.add_frames([scene(2 * k), scene(2 * k + 1)], t=float(k))
            events += [(type(e).__name__, e.turn, getattr(e, "token_ids", None)) for e in s.step()
                       if isinstance(e, (Reply, Silence, Evicted))]
        events += [(type(e).__name__, e.turn, getattr(e, "token_ids", None)) for e in s.finish()]
        runs[smooth] = (s, events)
    (plain_s, plain_ev), (smooth_s, smooth_ev) = runs[False], runs[True]
    assert smooth_ev == plain_ev and smooth_s.dialogue_ids() == plain_s.dialogue_ids()
    assert sum(e[0] == "Evicted" for e in smooth_ev) >= 3
    r = smooth_s._reanchor
    assert r.swaps >= 2 and r.swaps > r.misses, (r.swaps, r.misses)  # most evictions were served by the shadow
    for (k1, v1), (k2, v2) in zip(smooth_s.cache.host_layers(), plain_s.cache.host_layers()):
        np.testing.assert_allclose(k1, k2, atol=1e-4)
        np.testing.assert_allclose(v1, v2, atol=1e-4)


def test_sessions_satisfy_the_session_protocol(tiny_bundle):
    from edge_duet.runtime.remote import RemoteSession
    from edge_duet.runtime.session import SessionLike

    assert isinstance(Session(tiny_bundle), SessionLike)
    assert all(callable(getattr(RemoteSession, verb, None)) for verb in ("ask", "add_frames", "step", "finish",
                                                                          "reset", "cancel"))

    class Partial:  # a fake missing verbs is caught
        def step(self):
            return iter(())

    assert not isinstance(Partial(), SessionLike)


@pytest.mark.parametrize("decoder", ["plain", "fused"])
def test_context_verbs_move_lengths_and_positions(tiny_bundle, decoder):
    from edge_duet.runtime.context import Chunk, Context
    from edge_duet.runtime.engine import Engine

    engine = Engine(tiny_bundle, providers="cpu", graphs=("embed", "decoder"), decoder=decoder)
    ctx = Context(engine, capacity=16)
    logits = ctx.prefill([Chunk(ids=(1, 2, 3, 4, 5))], logits_index=[1, 4])
    assert logits.shape[0] == 2 and (ctx.length, ctx.next_pos) == (5, 5)
    after5 = ctx.decode(6)
    ctx.truncate(5, 5)  # roll back the decoded token: the same token gives the same logits again
    np.testing.assert_allclose(ctx.decode(6), after5, atol=1e-5)
    with pytest.raises(ValueError):
        ctx.truncate(7, 7)  # past the valid length
    with pytest.raises(UsageError, match="holds 16 tokens"):
        ctx.prefill([Chunk(ids=tuple(range(1, 12)))])
    assert ctx.length == 6  # a refused call changes nothing
    ctx.reset()
    assert (ctx.length, ctx.next_pos) == (0, 0)


@pytest.mark.parametrize("decoder", ["plain", "fused"])
def test_a_graph_that_does_not_match_its_manifest_is_refused_at_load(tiny_bundle, tmp_path, decoder):
    import json
    import shutil

    from edge_duet.manifest import DECODER_FLAVOURS
    from edge_duet.runtime.engine import Engine

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    graph = data["graphs"][DECODER_FLAVOURS[decoder]]
    graph["inputs"][0]["name"] = "hidden_in"  # the graph's first input is inputs_embeds
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"does not match its manifest entry \(inputs \['inputs_embeds'\] not "
                                          r"declared, \['hidden_in'\] missing\)"):
        Engine(bundle, decoder=decoder)
    Engine(tiny_bundle, decoder=decoder)  # the untouched bundle loads

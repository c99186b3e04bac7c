"""The remote backend against a real vLLM (CPU build) on loopback: replies id for id equal to the local ONNX
runtime's on the same checkpoint, the prefix cache hit on every turn, the fault cases, the CLI end to end, and
four simultaneous streams. The server comes from tests/vllm_server.py (skipped with the reason where vLLM is not
installed; CI installs it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch", reason="building the test checkpoint needs the export extra (torch)")

from chatty import dialogue_script, make_chatty_checkpoint, random_frames  # noqa: E402
from test_run_cli import make_video  # noqa: E402
from vllm_server import Relay, require_vllm, start_vllm  # noqa: E402

from edge_duet.apps.cli import app  # noqa: E402
from edge_duet.errors import ServerModelMismatch, ServerTimeout, ServerUnavailable  # noqa: E402
from edge_duet.export.onnx_export import ExportOptions, export_bundle  # noqa: E402
from edge_duet.runtime.events import Evicted, Reply, Silence, TokenDelta, TurnStats  # noqa: E402
from edge_duet.runtime.remote import RemoteSession, ServerOptions, load_remote_model  # noqa: E402
from edge_duet.runtime.session import Session, SessionOptions  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

NAME = "edge-duet-tiny"
MAX_NEW = 6
BLOCK = 32  # vLLM's --block-size in scripts/vllm_cpu.sh: the prefix cache reuses whole blocks


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(checkpoint, bundle exported from it, running vLLM serving it). The checkpoint is calibrated to say
    NO REPLY on most turns (tests/chatty.py), so dialogues mix silences and replies."""
    require_vllm()  # before a minute of calibrating and exporting
    root = tmp_path_factory.mktemp("remote")
    ckpt = make_chatty_checkpoint(root / "ckpt", shape="tiny-serve")
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(), log=lambda s: None)
    server = start_vllm(ckpt, NAME, root / "vllm", "--enable-scale-out")
    yield ckpt, bundle, server
    server.stop()


def feed(session, turn) -> None:
    frames, q, must, t = turn
    if q:
        session.ask(q, must_reply=must)
    session.add_frames(frames, t=t, channels="rgb")


def play(session, dialogue, on_turn=None):
    events = []
    for k, turn in enumerate(dialogue):
        feed(session, turn)
        events += list(session.step())
        if on_turn is not None:
            on_turn(k, session)
    events += list(session.finish())
    return events


def outcome(events, field: str = "token_ids"):
    """{turn: the reply's token ids (or ``field``), or None for a silence}: what the dialogue finally said (a late
    reply replaces a provisional local silence)."""
    out = {}
    for e in events:
        if isinstance(e, Silence):
            out.setdefault(e.turn, None)
        elif isinstance(e, Reply):
            out[e.turn] = getattr(e, field)
    return out


def remote(server_url: str, api: str = "tokens", **kw) -> ServerOptions:
    return ServerOptions(server_url, NAME, api=api, image_format="png", **kw)


# ------------------------------------------------------------------------------------------ no server needed


def test_checkpoint_files_describe_the_model_as_its_bundle_does(tiny_export):
    ckpt, bundle = tiny_export
    from edge_duet.manifest import Manifest

    m, d = Manifest.load(bundle), load_remote_model(ckpt)
    assert (d.tokens, d.preprocess, d.prompt) == (m.tokens, m.preprocess, m.prompt)


def test_server_options_normalise_the_url_and_reject_bad_values():
    o = ServerOptions("http://gpu:8000", "m")
    assert (o.api_url, o.root_url) == ("http://gpu:8000/v1", "http://gpu:8000")
    assert ServerOptions("http://gpu:8000/v1/", "m").api_url == "http://gpu:8000/v1"
    from edge_duet.errors import UsageError

    for bad in (dict(url="gpu:8000"), dict(api="grpc"), dict(image_format="webp"), dict(served_model="")):
        with pytest.raises(UsageError):
            ServerOptions(**{"url": "http://gpu:8000/v1", "served_model": "m", **bad})


# ------------------------------------------------------------------------------------------ against vLLM


def test_token_api_equals_local_runtime_and_hits_the_prefix_cache_every_turn(served):
    ckpt, bundle, server = served
    dialogue = dialogue_script(seed=3, turns=24)
    local = Session(bundle, SessionOptions(max_new_tokens=MAX_NEW))
    local_events = play(local, dialogue)

    usage = []
    with RemoteSession(ckpt, remote(server.url), SessionOptions(max_new_tokens=MAX_NEW)) as rs:
        remote_events = play(rs, dialogue, on_turn=lambda k, s: usage.append(dict(s.last_usage)))
        assert rs.dialogue_ids() == local.dialogue_ids()

    want, got = outcome(local_events), outcome(remote_events)
    assert got == want
    replies = [k for k, v in want.items() if v is not None]
    assert len(replies) >= 3 and len(want) - len(replies) >= 3, f"too few of each to test: {want}"
    texts = {e.turn: e.text for e in local_events if isinstance(e, Reply)}
    assert {e.turn: e.text for e in remote_events if isinstance(e, Reply)} == texts
    # streamed text adds up to each reply (but a last incomplete character); no deltas in silent turns
    deltas: dict[int, str] = {}
    for e in remote_events:
        if isinstance(e, TokenDelta):
            deltas[e.turn] = deltas.get(e.turn, "") + e.text
    assert set(deltas) <= set(texts)
    assert all(texts[k].startswith(v) and len(texts[k]) - len(v) <= 1 for k, v in deltas.items())

    # the engine reports cached prompt tokens on every turn after the first: at least the previous prompt's
    # whole blocks (the dialogue only grows between turns)
    assert usage[0]["cached_tokens"] is not None
    for k in range(1, len(usage)):
        assert usage[k]["cached_tokens"] >= usage[k - 1]["prompt_tokens"] // BLOCK * BLOCK > 0, (k, usage[k])


def test_eviction_keeps_the_same_turns_as_the_local_runtime(served):
    ckpt, bundle, server = served
    dialogue = dialogue_script(seed=5, turns=16)
    opts = SessionOptions(max_new_tokens=MAX_NEW, max_context_tokens=400)
    local_events = play(Session(bundle, opts), dialogue)
    with RemoteSession(ckpt, remote(server.url), opts) as rs:
        remote_events = play(rs, dialogue)
        assert rs.context_tokens <= 400
    assert sum(isinstance(e, Evicted) for e in remote_events) >= 2
    assert [(e.turn, e.kept_tokens) for e in remote_events if isinstance(e, Evicted)] == \
        [(e.turn, e.kept_tokens) for e in local_events if isinstance(e, Evicted)]
    assert outcome(remote_events) == outcome(local_events)


def test_chat_api_runs_the_protocol(served):
    """Chat completions: the server renders the template. The first turn's answer equals the local one (same
    prompt); later turns may not (random-weight replies are not clean text: see runtime/remote.py)."""
    ckpt, bundle, server = served
    dialogue = dialogue_script(seed=7, turns=8)
    dialogue[3] = (dialogue[3][0], "Answer now.", True, dialogue[3][3])  # a must-reply turn: prefix continued
    local_events = play(Session(bundle, SessionOptions(max_new_tokens=MAX_NEW)), dialogue[:1])
    usage = []
    with RemoteSession(ckpt, remote(server.url, api="chat"), SessionOptions(max_new_tokens=MAX_NEW)) as rs:
        events = play(rs, dialogue, on_turn=lambda k, s: usage.append(dict(s.last_usage)))
    # vLLM's detokenizer holds back a last incomplete UTF-8 character that the local decode shows as U+FFFD
    got, want = outcome(events, "text")[0], outcome(local_events, "text")[0]
    assert (got or "").rstrip("\ufffd") == (want or "").rstrip("\ufffd") and (got is None) == (want is None)
    assert sorted({e.turn for e in events if isinstance(e, (Reply, Silence))}) == list(range(8))
    assert sum(isinstance(e, TurnStats) for e in events) == 8
    assert all(u["cached_tokens"] and u["cached_tokens"] > 0 for u in usage[1:]), usage


def test_wrong_model_name_is_a_clear_error(served):
    ckpt, _, server = served
    with pytest.raises(ServerModelMismatch, match=f"serves '{NAME}', not 'mmduet2'.*ServerOptions.served_model"):
        RemoteSession(ckpt, ServerOptions(server.url, "mmduet2"))


def test_server_down_mid_run_loses_nothing(served):
    """The relay goes down between turns: the turn fails with ServerUnavailable after the retries, the
    dialogue is unchanged, and once the server is back the same step goes on; the whole run equals the local."""
    ckpt, bundle, server = served
    dialogue = dialogue_script(seed=11, turns=8)
    want = outcome(play(Session(bundle, SessionOptions(max_new_tokens=MAX_NEW)), dialogue))
    relay = Relay(server.port)
    rs = RemoteSession(ckpt, remote(relay.url, retries=2, backoff_s=0.05), SessionOptions(max_new_tokens=MAX_NEW))
    events = play(rs, dialogue[:4])
    before = (rs.turn, rs.context_tokens, rs.dialogue_ids())

    relay.down()
    feed(rs, dialogue[4])
    with pytest.raises(ServerUnavailable, match="cannot reach the server"):
        events += list(rs.step())
    assert (rs.turn, rs.context_tokens, rs.dialogue_ids()) == before

    relay.up()
    events += list(rs.step())  # the frames of turn 4 were kept
    events += play(rs, dialogue[5:])
    rs.close()
    relay.down()
    assert outcome(events) == want


def test_slow_server_times_out_then_recovers(served):
    ckpt, bundle, server = served
    dialogue = dialogue_script(seed=13, turns=4)
    want = outcome(play(Session(bundle, SessionOptions(max_new_tokens=MAX_NEW)), dialogue))
    relay = Relay(server.port)
    rs = RemoteSession(ckpt, remote(relay.url, read_timeout_s=0.5, retries=0),
                       SessionOptions(max_new_tokens=MAX_NEW))
    events = play(rs, dialogue[:2])
    relay.delay_s = 2.0  # every chunk of the answer held back longer than the read timeout
    feed(rs, dialogue[2])
    with pytest.raises(ServerTimeout, match="sent nothing for 0.5 s.*read_timeout_s"):
        events += list(rs.step())
    relay.delay_s = 0.0
    events += list(rs.step())
    events += play(rs, dialogue[3:])
    rs.close()
    relay.down()
    assert outcome(events) == want


def test_four_streams_at_once_without_errors(served, tmp_path):
    ckpt, _, server = served
    out = tmp_path / "streams.json"
    r = CliRunner().invoke(app, ["bench", str(ckpt), "--server", server.url, "--served-model", NAME,
                                 "--streams", "1,2,4", "--turns", "6", "--frame-size", "160x120",
                                 "--reply-tokens", "8", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["streams"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [1, 2, 4]
    for n, row in rows.items():
        assert (row["turns"], row["errors"]) == (6 * n, 0)
        assert row["latency_p50_s"] > 0 and row["cached_share"] > 0
    assert "| 4 | 24 | 0 |" in r.output


# ------------------------------------------------------------------------------------------ the CLI


def replies_of(events_file: Path) -> list[tuple]:
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    final: dict[int, tuple] = {}
    for e in events:
        if e["event"] == "silence":
            final.setdefault(e["turn"], None)
        elif e["event"] == "reply":
            final[e["turn"]] = (e["t"], e["text"], e["token_ids"])
    return sorted(final.items())


def test_cli_run_against_vllm_gives_the_local_replies(served, tmp_path):
    """The issue's "done when": `edge-duet run --video … --server …` equals the local runtime."""
    ckpt, bundle, server = served
    video = make_video(tmp_path / "scene.mp4", seconds=10.0)
    common = ["run", "--video", str(video), "--fast", "--ask", "what is moving?", "--max-new-tokens", str(MAX_NEW)]
    local = CliRunner().invoke(app, [*common, "--model", str(bundle), "--events", str(tmp_path / "local.jsonl")])
    assert local.exit_code == 0, local.output
    far = CliRunner().invoke(app, [*common, "--model", str(ckpt), "--server", server.url, "--served-model", NAME,
                                   "--server-api", "tokens", "--server-image", "png",
                                   "--events", str(tmp_path / "remote.jsonl")])
    assert far.exit_code == 0, far.output
    want = replies_of(tmp_path / "local.jsonl")
    assert replies_of(tmp_path / "remote.jsonl") == want and len(want) == 5


def test_cli_infer_against_vllm_gives_the_local_replies(served, tmp_path):
    from PIL import Image

    ckpt, bundle, server = served
    rng = np.random.default_rng(17)
    conv = []
    for k in range(6):
        names = []
        for j, f in enumerate(random_frames(rng, 2)):
            names.append(f"f{k}_{j}.png")
            Image.fromarray(f).save(tmp_path / names[-1])
        content = [{"type": "image", "image": n} for n in names]
        if k in (0, 3):
            content.append({"type": "text", "text": "What changed?"})
        conv.append({"role": "user", "content": content, "time": 2.0 * (k + 1), "must_reply": k == 3})
    (tmp_path / "in.json").write_text(json.dumps([{"question_id": "q1", "conversation": conv}]))
    outs = {}
    for name, extra in (("local", ["--model", str(bundle)]),
                        ("remote", ["--model", str(ckpt), "--server", server.url, "--served-model", NAME,
                                    "--server-api", "tokens", "--server-image", "png"])):
        r = CliRunner().invoke(app, ["infer", str(tmp_path / "in.json"), "-o", str(tmp_path / f"{name}.jsonl"),
                                     "--max-new-tokens", str(MAX_NEW), *extra])
        assert r.exit_code == 0, r.output
        outs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert outs["remote"] == outs["local"]
    assert any(x["role"] == "assistant" for x in json.loads(outs["local"])["model_response_list"])


def test_cli_errors_name_the_fix(served, tmp_path):
    ckpt, _, server = served
    video = make_video(tmp_path / "scene.mp4", seconds=10.0)
    base = ["run", "--video", str(video), "--fast", "--model", str(ckpt)]
    r = CliRunner().invoke(app, [*base, "--server", server.url, "--served-model", "mmduet2"])
    assert r.exit_code == 12 and f"serves '{NAME}'" in r.output
    relay = Relay(server.port)
    relay.down()
    r = CliRunner().invoke(app, [*base, "--server", relay.url, "--served-model", NAME])
    assert r.exit_code == 12 and "cannot reach the server" in r.output
    r = CliRunner().invoke(app, ["run", "--video", str(video), "--server", server.url, "--served-model", NAME])
    assert r.exit_code == 2 and "--server needs --model" in r.output
    r = CliRunner().invoke(app, [*base, "--server", server.url])
    assert r.exit_code == 2 and "--served-model" in r.output


def test_assistant_behind_serve_drives_the_remote_session(served):
    """`edge-duet serve --server …` runs the Assistant (worker thread, subscriptions) over a RemoteSession."""
    from edge_duet.runtime.assistant import Assistant, AssistantOptions

    ckpt, bundle, server = served
    frames = [f[..., ::-1].copy() for f in random_frames(np.random.default_rng(19), 2)]  # BGR, as a camera gives
    local = Session(bundle, SessionOptions(max_new_tokens=MAX_NEW))
    local.ask("What is moving?", must_reply=True)
    local.add_frames(frames, t=1.0)
    want = next(e for e in local.step() if isinstance(e, Reply))

    session = RemoteSession(ckpt, remote(server.url), SessionOptions(max_new_tokens=MAX_NEW))
    with Assistant(options=AssistantOptions(frame_interval_s=1.0, frames_per_turn=2), session=session) as a, \
            a.subscribe() as sub:
        a.ask("What is moving?", must_reply=True)
        a.add_frame(frames[0], t=0.0)
        a.add_frame(frames[1], t=1.0)
        seen = []
        while not any(isinstance(e, TurnStats) for e in seen):
            e = sub.get(timeout=30)
            assert e is not None, f"no TurnStats; saw {seen}"
            seen.append(e)
        assert a.status()["turns"] == 1
    got = next(e for e in seen if isinstance(e, Reply))
    assert (got.turn, got.text, got.token_ids) == (want.turn, want.text, want.token_ids)
    session.close()


def test_cancel_ends_the_reply_where_it_is_as_locally(served):
    """cancel() on the first streamed text closes the stream; the dialogue goes on exactly as a local session
    cancelled at the same token."""
    ckpt, bundle, server = served
    dialogue = dialogue_script(seed=23, turns=5)
    dialogue[0] = (dialogue[0][0], "Describe it.", True, dialogue[0][3])  # must reply: text streams at once

    def run(session):
        events = []
        for k, turn in enumerate(dialogue):
            feed(session, turn)
            for e in session.step():
                events.append(e)
                if k == 0 and isinstance(e, TokenDelta):
                    session.cancel()
        return events + list(session.finish())

    local = Session(bundle, SessionOptions(max_new_tokens=MAX_NEW))
    want = run(local)
    with RemoteSession(ckpt, remote(server.url), SessionOptions(max_new_tokens=MAX_NEW)) as rs:
        got = run(rs)
        assert rs.dialogue_ids() == local.dialogue_ids()
    first = next(e for e in got if isinstance(e, Reply) and e.turn == 0)
    assert 1 <= len(first.token_ids) < MAX_NEW
    assert outcome(got) == outcome(want)

"""The proactive session against a remote serving engine (vLLM): same verbs, same events, same context policy.

The device keeps what must stay local (capture, questions, speech, display) and sends each turn to an engine
that batches many streams and caches prefixes::

    frames --smart-resize to the model's pixel budget--> JPEG/PNG data URLs (the network carries no more pixels
                                                           than the model uses)
    dialogue so far (bounded by the eviction policy) + new user turn + assistant start
           --POST, streamed, greedy--> tokens back as TokenDelta ... Reply | Silence, then TurnStats

The engine's prefix cache holds the dialogue's KV, so a turn costs its new tokens there, as it does locally.
Differences from :class:`~edge_duet.runtime.session.Session`:

- No speculation: the server decodes ``NO REPLY`` itself (a few tokens, batched with other streams), so a
  silence is final at once and ``finish()`` has nothing to confirm. Replies are those of plain greedy decoding,
  as locally.
- Two APIs (:class:`~edge_duet.runtime.remote_client.ServerOptions`): ``tokens`` keeps the dialogue as token
  ids and is exact (the tests compare it id for id with the local runtime); ``chat`` keeps it as text and lets
  the server render the template: what a trained model needs, but a reply that is not clean text (random
  weights) re-encodes to other ids, so later turns may differ from a local run. The chat API returns text only:
  its ``TokenDelta.token_id`` is -1 and ``Reply.token_ids`` are the reply's text encoded again.
- Eviction drops the same turns as locally; the server then prefills the kept window once (one prefix miss).
  It also keeps the number of images under the server's ``--limit-mm-per-prompt``.
- A request that fails leaves the dialogue as it was and puts the turn's frames and question back: the next
  ``step()`` sends them again (nothing lost), after the caller has seen the :class:`ServerError`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from edge_duet.errors import BundleError, ServerError, UsageError
from edge_duet.manifest import MANIFEST_NAME, Manifest, PreprocessSpec, PromptSpec, TokenSpec

from .chat import ChatRenderer, ImagePiece, Piece
from .events import Event, Evicted, Reply, Silence, TokenDelta, TurnStarted, TurnStats
from .preprocess import resize_frame
from .remote_client import Client, ServerOptions
from .session import QuestionInbox, SessionOptions, eviction_budget, plan_eviction

__all__ = ["RemoteModel", "RemoteSession", "ServerOptions", "load_remote_model"]


@dataclass(frozen=True)
class RemoteModel:
    """What the device must know of the served model: its tokenizer, special tokens, pixel budget and proactive
    prompt. Read from a bundle's manifest or from the checkpoint's small files; the weights stay on the server."""

    name: str
    tokens: TokenSpec
    preprocess: PreprocessSpec
    prompt: PromptSpec
    tokenizer_path: Path
    variant: str = "remote"


def load_remote_model(path: str | Path) -> RemoteModel:
    """A bundle directory (manifest.json) or a Hugging Face checkpoint directory of the served model; of a
    checkpoint only config.json, tokenizer.json, preprocessor_config.json and proactive.json are read."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        m = Manifest.load(path)
        return RemoteModel(m.name, m.tokens, m.preprocess, m.prompt, path / m.tokenizer)
    missing = [n for n in ("config.json", "tokenizer.json", "preprocessor_config.json") if not (path / n).is_file()]
    if not path.is_dir() or missing:
        raise BundleError(
            f"`model` {path} is neither an edge-duet bundle nor a checkpoint directory"
            + (f" (no {', '.join(missing)})" if path.is_dir() else "")
            + ": with a remote server, the model names the served model's files on this device: its bundle, or a folder "
            "with the checkpoint's config.json, tokenizer.json, preprocessor_config.json (weights not needed)"
        )
    from tokenizers import Tokenizer

    from edge_duet.protocol import read_proactive

    def read(name: str) -> dict:
        try:
            return json.loads((path / name).read_text()) if (path / name).is_file() else {}
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path / name} is unreadable or not JSON ({exc})") from exc

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))

    tokens = TokenSpec.from_tokenizer(tok.token_to_id, lambda t: BundleError(
        f"{path / 'tokenizer.json'} lacks the special token {t}: not a Qwen2.5-VL tokenizer"))
    vision = read("config.json").get("vision_config", {})
    preprocess = PreprocessSpec.from_preprocessor_config(  # as the exporter reads it
        read("preprocessor_config.json"), vision.get("patch_size", 14), vision.get("spatial_merge_size", 2),
        vision.get("temporal_patch_size", 2))
    prompt, max_pixels, _ = read_proactive(path).resolve(preprocess.max_pixels)  # as the exporter resolves it
    preprocess = dataclasses.replace(preprocess, max_pixels=max_pixels)
    return RemoteModel(path.name, tokens, preprocess, prompt, path / "tokenizer.json")


@dataclass
class _Message:
    """One message of the dialogue as both APIs need it."""

    turn: int
    role: str
    ids: list[int]  # tokens API: one <|image_pad|> per frame (the server expands it)
    num_tokens: int  # what the model sees: frames expanded
    images: list[str] = field(default_factory=list)  # data URLs of this message's frames, in order
    content: Any = ""  # chat API: the message's content
    question: str | None = None
    frame_tokens: list[int] = field(default_factory=list)  # visual tokens of each frame


@dataclass
class _Frame:
    url: str
    grid: tuple[int, int, int]  # (1, gh, gw) in patches


class RemoteSession(QuestionInbox):
    """A proactive dialogue whose model runs on a remote engine. Single-threaded except :meth:`cancel`.

    ``model``: the served model's bundle or checkpoint directory (see :func:`load_remote_model`).
    Options not meaningful remotely (token drop, providers, threads, speculation) must be left at their defaults.
    """

    def __init__(self, model: str | Path | RemoteModel, server: ServerOptions,
                 options: SessionOptions = SessionOptions(), client: Client | None = None, max_images: int = 64):
        from tokenizers import Tokenizer

        if options.token_drop_threshold is not None:
            raise UsageError("`token_drop_threshold` needs the local runtime: the server computes the visual tokens")
        if options.providers or options.threads:
            raise UsageError("`providers` and `threads` choose local ONNX Runtime settings; leave them out with a "
                             "remote server")
        if options.max_new_tokens < 1:
            raise UsageError("max_new_tokens must be at least 1")
        self.model = model if isinstance(model, RemoteModel) else load_remote_model(model)
        if options.max_pixels is not None:  # the per-frame budget the frames are resized to before they are sent
            self.model = dataclasses.replace(
                self.model, preprocess=dataclasses.replace(self.model.preprocess, max_pixels=options.max_pixels))
        self.manifest = self.model  # what apps read: .name, .variant, .prompt
        self.server = server
        self.options = options
        self.tokenizer = Tokenizer.from_file(str(self.model.tokenizer_path))
        self.renderer = ChatRenderer(self.tokenizer, self.model.tokens, self.model.preprocess.merge_size)
        self.max_context_tokens = options.max_context_tokens or self.model.prompt.max_context_tokens
        self.max_images = max_images
        self.client = client or Client(server)
        self.served = self.client.check_model(self.max_context_tokens)  # fails fast: unreachable, wrong model
        self._no_reply_ids = self.renderer.text_ids(self.model.prompt.no_reply_text)
        self._nl_ids = list(self.renderer.assistant_end()[0].ids[1:])
        self._eos = set(self.model.tokens.eos_ids)
        self._cancel = threading.Event()
        self.requests = 0
        self.last_usage: dict[str, int | None] = {}
        self.reset()

    # ------------------------------------------------------------------ public verbs
    def reset(self, system_prompt: str | None = None) -> None:
        self.system_prompt = system_prompt or self.options.system_prompt or self.model.prompt.system_prompt
        ids = list(self.renderer.system(self.system_prompt)[0].ids)
        self.messages: list[_Message] = [_Message(-1, "system", ids, len(ids), content=self.system_prompt)]
        self.turn = 0
        self._frames: list[_Frame] = []
        self._encode_s = 0.0
        self._t = 0.0
        self._question: str | None = None
        self._must_reply = False

    def add_frames(self, frames: Sequence, t: float, channels: str = "bgr") -> None:
        t0 = time.perf_counter()
        spec = self.model.preprocess
        for frame in frames:
            image = resize_frame(frame, spec, channels)
            self._frames.append(_Frame(self._data_url(image), (1, image.height // spec.patch_size,
                                                               image.width // spec.patch_size)))
        self._t = float(t)
        self._encode_s += time.perf_counter() - t0

    def cancel(self) -> None:
        """Stop the reply being received (thread-safe): the stream is closed, the reply ends where it is."""
        self._cancel.set()

    def finish(self) -> Iterator[Event]:
        """End of stream. Nothing to confirm: a remote silence is final when it arrives."""
        return iter(())

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def context_tokens(self) -> int:
        return sum(m.num_tokens for m in self.messages)

    @property
    def decoder_calls_total(self) -> int:
        return self.requests

    def dialogue_ids(self) -> list[int]:
        """The dialogue as the model sees it, frames expanded to image-pad ids (tokens API; for tests)."""
        pad = self.model.tokens.image_pad
        out: list[int] = []
        for m in self.messages:
            it = iter(m.frame_tokens)
            for i in m.ids:
                out.extend([pad] * next(it) if i == pad else [i])
        return out

    def step(self) -> Iterator[Event]:
        """Send one user turn with the frames and text added since the last step; yields its events."""
        if not self._frames and self._question is None:
            return
        self._cancel.clear()
        turn, t, started = self.turn, self._t, time.perf_counter()
        frames, question, must_reply, encode_s = self._frames, self._question, self._must_reply, self._encode_s
        self._frames, self._question, self._must_reply, self._encode_s = [], None, False, 0.0
        self.turn += 1
        yield TurnStarted(turn, t, len(frames), question, must_reply)

        prefix = self.model.prompt.must_reply_prefix if must_reply else None
        user = self._user_message(turn, frames, question)
        start = list(self.renderer.assistant_start(prefix)[0].ids)
        incoming = user.num_tokens + len(start)
        if incoming + self.options.max_new_tokens + 64 > self.max_context_tokens:
            raise UsageError(
                f"one turn needs {incoming} tokens, too many for max_context_tokens={self.max_context_tokens}: "
                "raise `max_context_tokens` or lower the frame resolution"
            )
        if len(frames) > self.max_images // 2:
            raise UsageError(f"{len(frames)} frames in one turn: the server takes {self.max_images} images per "
                             "request; send fewer frames per turn")
        if (self.context_tokens + incoming + self.options.max_new_tokens > self.max_context_tokens
                or self._num_images() + len(frames) > self.max_images):
            yield self._evict(turn, t)

        try:
            answer = yield from self._request(turn, t, started, user, start, prefix, must_reply)
        except ServerError:
            # Nothing lost: the dialogue is unchanged, the turn's inputs wait for the next step.
            self._frames = frames + self._frames
            self._encode_s += encode_s
            if question is not None:
                self._question = question if self._question is None else question + "\n" + self._question
            self._must_reply = self._must_reply or must_reply
            self.turn = turn
            raise
        generated, closing, content, text, prefill_s, decode_s = answer
        ids = start + generated + closing
        n_asst = len(ids) if self.server.api == "tokens" else len(start) + len(self.renderer.text_ids(text)) + 2
        self.messages += [user, _Message(turn, "assistant", ids, n_asst, content=content)]
        if not text.strip() or text.strip() == self.model.prompt.no_reply_text:
            yield Silence(turn, t)
        else:
            token_ids = tuple(generated) if self.server.api == "tokens" else tuple(self.renderer.text_ids(text))
            yield Reply(turn, t, text, token_ids, time.perf_counter() - started)
        visual = sum(user.frame_tokens)
        yield TurnStats(turn, t, encode_s, prefill_s, decode_s, 1, incoming, self.context_tokens,
                        self.max_context_tokens, visual, 0)

    # ------------------------------------------------------------------ one request
    def _request(self, turn: int, t: float, started: float, user: _Message, start: list[int],
                 prefix: str | None, must_reply: bool):
        """Stream one turn's answer. Returns (generated ids, closing ids, chat content, text, prefill s, decode s).
        (A generator: yields TokenDelta as tokens arrive.)"""
        o, tokens_api = self.options, self.server.api == "tokens"
        sampling: dict[str, Any] = {"temperature": o.temperature, "max_tokens": o.max_new_tokens,
                                    "stop_token_ids": sorted(self._eos), "repetition_penalty": 1.0, "top_p": 1.0}
        if o.top_k > 0:
            sampling["top_k"] = o.top_k
        if o.seed is not None:
            sampling["seed"] = o.seed
        history = self.messages + [user]
        if tokens_api:
            body: dict[str, Any] = {"model": self.server.served_model, "sampling_params": sampling,
                                    "token_ids": [i for m in history for i in m.ids] + start}
            images = [u for m in history for u in m.images]
            if images:
                body["content_parts"] = [{"type": "image_url", "url": u} for u in images]
        else:
            msgs = [{"role": m.role, "content": m.content} for m in history]
            body = {"model": self.server.served_model, "messages": msgs, **sampling}
            if prefix:  # the assistant turn starts with the prefill text: continue it
                msgs.append({"role": "assistant", "content": prefix})
                body.update(continue_final_message=True, add_generation_prompt=False)
        self.requests += 1
        # Silence is held back (no TokenDelta) while the answer can still become exactly NO REPLY, as locally.
        hold = o.temperature == 0 and not must_reply
        nr_text = self.model.prompt.no_reply_text
        generated: list[int] = []
        text, shown, held = "", "", hold
        stop_token: int | None = None
        first_at: float | None = None
        usage: dict = {}
        t0 = time.perf_counter()
        stream = self.client.stream(body)
        try:
            for event in stream:
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    if first_at is None:
                        first_at = time.perf_counter()
                    if tokens_api:
                        new = [int(i) for i in choice.get("token_ids") or ()]
                        for i in new:
                            if i in self._eos:
                                stop_token = i
                            elif stop_token is None:
                                generated.append(i)
                        text = self._text(generated)
                        held = held and self._no_reply_ids[:len(generated)] == generated
                    else:
                        text += (choice.get("delta") or {}).get("content") or ""
                        held = held and nr_text.startswith(text)
                    if not held and not text.endswith("\ufffd") and len(text) > len(shown):
                        yield TokenDelta(turn, t, text[len(shown):], generated[-1] if generated else -1)
                        shown = text
                    if isinstance(choice.get("stop_reason"), int) and choice.get("finish_reason") == "stop":
                        stop_token = choice["stop_reason"]
                if self._cancel.is_set():
                    break
        finally:
            stream.close()  # closing the connection aborts the request on the server
        end = time.perf_counter()
        prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        self.last_usage = {"prompt_tokens": prompt_tokens, "cached_tokens": details.get("cached_tokens"),
                           "completion_tokens": usage.get("completion_tokens")}
        im_end = self.model.tokens.im_end
        if stop_token is not None:  # as the local session closes a reply: the stop token, <|im_end|>, "\n"
            closing = [stop_token] + ([im_end] if stop_token != im_end else []) + self._nl_ids
        else:  # budget reached or cancelled
            closing = [im_end] + self._nl_ids
        content = (prefix or "") + text
        first_at = first_at or end
        return generated, closing, content, text, first_at - t0, end - first_at

    # ------------------------------------------------------------------ messages
    def _user_message(self, turn: int, frames: list[_Frame], question: str | None) -> _Message:
        pieces = self.renderer.user([f.grid for f in frames], question)
        ids = [i for p in pieces for i in ((p.pad_id,) if isinstance(p, ImagePiece) else p.ids)]
        if frames:
            content: Any = [{"type": "image_url", "image_url": {"url": f.url}} for f in frames]
            if question:
                content.append({"type": "text", "text": question})
        else:
            content = question
        return _Message(turn, "user", ids, _count(pieces), [f.url for f in frames], content, question,
                        [p.num_tokens for p in pieces if isinstance(p, ImagePiece)])

    def _num_images(self) -> int:
        return sum(len(m.images) for m in self.messages)

    def _data_url(self, image) -> str:
        buf = io.BytesIO()
        if self.server.image_format == "png":
            image.save(buf, format="PNG")
            mime = "image/png"
        else:
            image.save(buf, format="JPEG", quality=self.server.jpeg_quality)
            mime = "image/jpeg"
        return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ bounded memory
    def _evict(self, turn: int, t: float) -> Evicted:
        """The local session's policy (see Session._evict): keep the system prompt, the newest whole turns that
        fit in half the token budget (and half the image limit), and the newest question's text if its turn
        fell out, with the answer that followed it. The server prefills the kept window once."""
        t0 = time.perf_counter()
        before = self.context_tokens
        system, rest = self.messages[0], self.messages[1:]
        budget = eviction_budget(self.max_context_tokens, system.num_tokens)
        i, q_at = plan_eviction(rest, budget, max_images=self.max_images // 2)
        kept, dropped = list(rest[i:]), rest[:i]
        if q_at is not None:
            q = dropped[q_at]
            kept[:0] = [self._user_message(q.turn, [], q.question), *dropped[q_at + 1:q_at + 2]]
        self.messages = [system] + kept
        return Evicted(turn, t, before - self.context_tokens, self.context_tokens, time.perf_counter() - t0)


def _count(pieces: Sequence[Piece]) -> int:
    return sum(p.num_tokens for p in pieces)

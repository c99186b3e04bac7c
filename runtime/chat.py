"""The proactive dialogue rendered straight to token ids, identical to Qwen2-VL's chat template + processor.

No transformers: a ``tokenizers.Tokenizer`` (the bundle's tokenizer.json) and the special-token ids of the
manifest. The checkpoint's template (export/tokenizer.py writes it into the bundle) is::

    {% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
    You are a helpful assistant.<|im_end|>
    {% endif %}<|im_start|>{{ message['role'] }}
    {% if message['content'] is string %}{{ message['content'] }}<|im_end|>
    {% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content
    or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or
    'video' in content %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}
    {% endif %}{% endfor %}<|im_end|>
    {% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
    {% endif %}

and the Qwen processor then repeats each ``<|image_pad|>`` ``t*gh*gw / merge**2`` times before tokenizing.

Why encoding piece by piece equals tokenizing the whole rendered string: the tokenizer cuts special tokens out
first and encodes each stretch of text between them on its own. So the renderer emits special tokens by id and
encodes every stretch between two special tokens as **one** string (``"system\\n" + prompt``, not the two
separately: a prompt starting with a newline would merge with the role's newline in the reference).
Stretches that never change (``"\\n"``, ``"user\\n"``) are encoded once and cached.

Generated reply ids are appended by the caller as they were sampled and never re-encoded: decoding and
re-encoding does not always give the same ids back.

A turn is a list of :data:`Piece`: :class:`TextPiece` (ids to embed) and :class:`ImagePiece` (a frame whose
merged visual embeddings go there; ``<|vision_start|>`` / ``<|vision_end|>`` are text around it)::

    user([(1, 16, 20), (1, 16, 20)], "What now?") ->
      Text[<|im_start|> user \\n <|vision_start|>]  Image(80 tokens)  Text[<|vision_end|> <|vision_start|>]
      Image(80 tokens)  Text[<|vision_end|> What now? <|im_end|> \\n]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from edge_duet.errors import InputError
from edge_duet.manifest import TokenSpec
from edge_duet.protocol import QWEN_SYSTEM_PROMPT

__all__ = ["QWEN_SYSTEM_PROMPT", "TextPiece", "ImagePiece", "Piece", "ChatRenderer", "render_ids", "num_tokens"]

# What the template inserts when a dialogue does not start with a system message.


@dataclass(frozen=True)
class TextPiece:
    """Token ids that go through the embedding graph."""

    ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ImagePiece:
    """One frame's place in the sequence: ``num_tokens`` merged visual tokens (``t*gh*gw / merge**2``).

    ``grid_thw`` is the frame's patch grid ``(t, gh, gw)`` as returned by preprocessing (M-RoPE needs it);
    ``pad_id`` is the ``<|image_pad|>`` id the reference puts at each of these positions.
    """

    grid_thw: tuple[int, int, int]
    num_tokens: int
    pad_id: int


Piece = Union[TextPiece, ImagePiece]


def render_ids(pieces: Iterable[Piece]) -> list[int]:
    """Flat token ids with every image expanded to ``num_tokens`` image-pad ids (what the reference feeds)."""
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, ImagePiece):
            ids.extend([piece.pad_id] * piece.num_tokens)
        else:
            ids.extend(piece.ids)
    return ids


def num_tokens(pieces: Iterable[Piece]) -> int:
    """Sequence length the pieces occupy (cache slots; not positions, which M-RoPE counts differently)."""
    return sum(p.num_tokens for p in pieces)


class _Builder:
    """Collects ids, merging consecutive text into one :class:`TextPiece`."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self._text: list[int] = []

    def text(self, ids: Sequence[int]) -> None:
        self._text.extend(ids)

    def image(self, piece: ImagePiece) -> None:
        self._flush()
        self.pieces.append(piece)

    def _flush(self) -> None:
        if self._text:
            self.pieces.append(TextPiece(tuple(self._text)))
            self._text = []

    def build(self) -> list[Piece]:
        self._flush()
        return self.pieces


class ChatRenderer:
    """Renders turns of the proactive dialogue to :data:`Piece` lists.

    tokenizer: a ``tokenizers.Tokenizer`` whose added special tokens include Qwen's ``<|im_start|>`` etc.
    tokens: their ids (the manifest's :class:`TokenSpec`). merge_size: the vision merger's spatial merge (2).

    A dialogue is ``system(...)``, then for every turn ``user(...)``, ``assistant_start(...)``, the generated ids,
    ``assistant_end()``. Concatenated, :func:`render_ids` of these equals the reference's ids for the same
    messages (the template with ``add_generation_prompt=True`` for an open assistant turn).
    """

    def __init__(self, tokenizer, tokens: TokenSpec, merge_size: int = 2):
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.merge_size = merge_size
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ encoding
    def text_ids(self, text: str) -> list[int]:
        """Ids of plain text (no BOS/EOS added). Special-token strings inside ``text`` become their special ids,
        as they do in the reference, which tokenizes the rendered template."""
        if not text:
            return []
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _fixed(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = tuple(self.text_ids(text))
        return ids

    def _role_line(self, role: str, text: str | None) -> list[int]:
        """``<|im_start|>{role}\\n{text}`` where text shares the role's stretch between special tokens."""
        head = f"{role}\n"
        return [self.tokens.im_start, *(self.text_ids(head + text) if text else self._fixed(head))]

    # ------------------------------------------------------------------ turns
    def system(self, prompt: str = QWEN_SYSTEM_PROMPT) -> list[Piece]:
        """``<|im_start|>system\\n{prompt}<|im_end|>\\n``."""
        return [TextPiece((*self._role_line("system", prompt), self.tokens.im_end, *self._fixed("\n")))]

    def image(self, grid_thw: Sequence[int]) -> ImagePiece:
        """The placeholder for one frame of patch grid ``(t, gh, gw)``."""
        t, gh, gw = (int(v) for v in grid_thw)
        m = self.merge_size
        if t < 1 or gh < m or gw < m or gh % m or gw % m:
            raise InputError(
                f"image grid {tuple(grid_thw)} is not a valid (t, gh, gw) patch grid: gh and gw must be positive "
                f"multiples of the merge size {m}. Pass the grid returned by preprocess_frame."
            )
        return ImagePiece((t, gh, gw), t * gh * gw // (m * m), self.tokens.image_pad)

    def user(self, grids: Sequence[Sequence[int]] = (), text: str | None = None) -> list[Piece]:
        """``<|im_start|>user\\n`` + per frame ``<|vision_start|>[image]<|vision_end|>`` + text + ``<|im_end|>\\n``.

        grids: one ``(t, gh, gw)`` per frame, in order. text: the question or subtitle of this turn, or None.
        """
        b = _Builder()
        if not grids:
            # No frame: the text shares the stretch after "user\n" (see the module docstring).
            b.text(self._role_line("user", text))
        else:
            b.text(self._role_line("user", None))
            for grid in grids:
                b.text([self.tokens.vision_start])
                b.image(self.image(grid))
                b.text([self.tokens.vision_end])
            b.text(self.text_ids(text or ""))
        b.text([self.tokens.im_end, *self._fixed("\n")])
        return b.build()

    def assistant_start(self, prefill: str | None = None) -> list[Piece]:
        """``<|im_start|>assistant\\n`` and, for a must-reply turn, the prefill text (e.g. ``"I must reply.\\n"``),
        which stays part of the reply. Generation continues right after these ids."""
        return [TextPiece(tuple(self._role_line("assistant", prefill)))]

    def assistant_end(self) -> list[Piece]:
        """``<|im_end|>\\n`` closing an assistant turn after its generated ids.

        When generation stopped on ``<|im_end|>`` the caller already holds that id: append only the
        ``"\\n"`` (``assistant_end()[0].ids[1:]``) so it is not doubled.
        """
        return [TextPiece((self.tokens.im_end, *self._fixed("\n")))]

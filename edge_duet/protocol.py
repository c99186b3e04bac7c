"""The proactive protocol's facts, in one place (see shared/PROTOCOL.md; MMDuet2's inference code and paper).

Everything that has to agree between export, the runtime and training reads these names: the literal strings the
model emits and is prompted with, and MMDuet2's defaults for a checkpoint that carries no edge-duet settings
(``proactive.json``), which is every MMDuet2 checkpoint as published.
"""

from __future__ import annotations

NO_REPLY = "NO REPLY"
MUST_REPLY_PREFIX = "I must reply.\n"

# MMDuet2's inference default (a system turn in the data overrides it). It was trained and evaluated with this
# exact string: without it the model runs off the distribution it learned to be proactive in.
MMDUET2_SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to answer questions based on continuously incoming video frames. "
    "Your responses should include information from the video since your last reply (if any). If the information "
    'in this segment of the video cannot answer the question, output "NO REPLY".'
)
# Qwen2.5-VL's chat template writes this when a dialogue has no system turn.
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
# The demo model's own system prompt (train/, edge_duet/models/demo). It is no default: a checkpoint without
# proactive.json gets MMDuet2's; the demo checkpoint carries this one in its proactive.json.
DEMO_SYSTEM_PROMPT = (
    "You are watching a live video. Frames arrive continuously, one user turn at a time. "
    "Answer the user's questions from what the video shows. When you reply, say what the video showed since "
    "your last reply. If the frames so far cannot answer the question, output NO REPLY."
)

# Frame timing: MMDuet2 recommends 1 s per frame at inference, 2 frames per user turn.
MMDUET2_FRAME_INTERVAL_S = 1.0
MMDUET2_FRAMES_PER_TURN = 2
# Per-frame pixel budget of MMDuet2's training: about 128 visual tokens per frame (~100k pixels, e.g. 364x280).
# One visual token covers 28x28 px (14-px patches, 2x2 merge), so 128 tokens are 128 * 28 * 28 = 100,352 px.
# Qwen2.5-VL's stock preprocessor_config.json allows 12.8 M px: a 640x480 frame would take ~390 tokens.
MMDUET2_TOKENS_PER_FRAME = 128
MMDUET2_MAX_PIXELS = MMDUET2_TOKENS_PER_FRAME * 28 * 28
DEFAULT_MAX_CONTEXT_TOKENS = 8192

# Where a bundle's protocol setting came from (the manifest's ``protocol_sources``).
SOURCE_MMDUET2 = "mmduet2-default"
SOURCE_PROACTIVE_JSON = "proactive.json"
SOURCE_PREPROCESSOR = "preprocessor_config.json"
SOURCE_EXPORT_FLAG = "export option"


# ----------------------------------------------------------------------------------------------- settings

import json  # noqa: E402  (kept below the facts: they are what most readers come for)
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from .errors import CheckpointError  # noqa: E402

PROACTIVE_FILE = "proactive.json"
# The settings a bundle's protocol is made of, in the order `inspect` prints them.
SETTINGS = ("system_prompt", "frame_interval_s", "frames_per_turn", "max_context_tokens", "max_pixels")


@dataclass(frozen=True)
class PromptSpec:
    """A bundle's proactive protocol (the manifest's ``prompt``; shared/PROTOCOL.md), every field defaulting to
    MMDuet2's value. Overridable at run time (``SessionOptions``)."""

    system_prompt: str = MMDUET2_SYSTEM_PROMPT
    no_reply_text: str = NO_REPLY
    must_reply_prefix: str = MUST_REPLY_PREFIX
    frame_interval_s: float = MMDUET2_FRAME_INTERVAL_S
    frames_per_turn: int = MMDUET2_FRAMES_PER_TURN
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS


@dataclass(frozen=True)
class ProactiveDefaults(PromptSpec):
    """edge-duet's proactive settings carried by a checkpoint (``proactive.json``), copied into bundles: the
    bundle's :class:`PromptSpec` fields (inherited, so each is declared once) plus the per-frame pixel budget.

    Every field defaults to MMDuet2's value, so a checkpoint without the file runs MMDuet2's protocol.
    ``max_pixels`` (the per-frame pixel budget) ``None`` means: MMDuet2's budget where the checkpoint has no
    ``proactive.json``, the checkpoint's own ``preprocessor_config.json`` where it has one.
    ``present`` names the fields the file actually set (for the manifest's ``protocol_sources``).
    """

    max_pixels: int | None = None
    extra: dict = field(default_factory=dict)
    present: frozenset = field(default=frozenset(), compare=False, repr=False)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "present"}

    def prompt(self, system_prompt: str | None = None, frame_interval_s: float | None = None,
               frames_per_turn: int | None = None, max_context_tokens: int | None = None) -> PromptSpec:
        """The bundle's proactive protocol: these settings, each overridden where a value is given."""
        return PromptSpec(
            system_prompt=system_prompt or self.system_prompt, no_reply_text=self.no_reply_text,
            must_reply_prefix=self.must_reply_prefix, frame_interval_s=frame_interval_s or self.frame_interval_s,
            frames_per_turn=frames_per_turn or self.frames_per_turn,
            max_context_tokens=max_context_tokens or self.max_context_tokens,
        )

    def resolve(self, stock_max_pixels: int, overrides: dict | None = None) -> tuple[PromptSpec, int, dict[str, str]]:
        """(prompt, per-frame max_pixels, where each setting came from) with ``overrides`` (export options,
        ``None`` values ignored) taking precedence over the file, and the file over MMDuet2's defaults."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(overrides) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown protocol settings {sorted(unknown)}")
        sources = {}
        for key in SETTINGS:
            if key in overrides:
                sources[key] = SOURCE_EXPORT_FLAG
            elif key in self.present and getattr(self, key) is not None:
                sources[key] = SOURCE_PROACTIVE_JSON
            else:
                sources[key] = SOURCE_MMDUET2
        if "max_pixels" in overrides:
            max_pixels = int(overrides["max_pixels"])
        elif self.max_pixels is not None:
            max_pixels = int(self.max_pixels)
        elif self.present:  # an edge-duet checkpoint without a budget of its own: its preprocessor's
            max_pixels, sources["max_pixels"] = stock_max_pixels, SOURCE_PREPROCESSOR
        else:  # MMDuet2 as published: its training budget, never more than the preprocessor allows
            max_pixels = min(MMDUET2_MAX_PIXELS, stock_max_pixels)
            if max_pixels == stock_max_pixels and stock_max_pixels < MMDUET2_MAX_PIXELS:
                sources["max_pixels"] = SOURCE_PREPROCESSOR
        prompt = self.prompt(**{k: overrides.get(k) for k in SETTINGS if k != "max_pixels"})
        return prompt, max_pixels, sources


def read_proactive(path: Path) -> ProactiveDefaults:
    """A checkpoint directory's ``proactive.json`` (unknown keys ignored), or MMDuet2's defaults where it has none."""
    f = Path(path) / PROACTIVE_FILE
    if not f.is_file():
        return ProactiveDefaults()
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{f} is unreadable or not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{f} must hold a JSON object of settings, not {type(data).__name__}")
    known = {k: v for k, v in data.items() if k in ProactiveDefaults.__dataclass_fields__ and k != "present"}
    return ProactiveDefaults(**known, present=frozenset(known))

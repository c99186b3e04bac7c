"""edge-duet: proactive video assistants (MMDuet2 / Qwen2.5-VL) on edge devices.

The whole public API::

    from edge_duet import Assistant, Session, SessionOptions

    with Assistant("path/to/bundle") as assistant:      # a worker thread owns the model
        assistant.ask("Tell me when a red circle appears.")
        assistant.add_frame(frame_bgr)                   # or assistant.attach(source)
        for event in assistant.subscribe(): ...

    session = Session("path/to/bundle")                  # the single-threaded core
    session.add_frames([frame1, frame2], t=2.0)
    for event in session.step(): ...

Heavy modules are imported on first use, so ``import edge_duet`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AssistantBusy,
    AssistantClosed,
    BundleError,
    CheckpointError,
    EdgeDuetError,
    InputError,
    ProviderError,
    SourceError,
    ValidationError,
)
from .manifest import Manifest  # noqa: E402

_LAZY = {
    "Session": "edge_duet.runtime.session",
    "SessionOptions": "edge_duet.runtime.session",
    "Assistant": "edge_duet.runtime.assistant",
    "AssistantOptions": "edge_duet.runtime.assistant",
    "Subscription": "edge_duet.runtime.subscription",
    "Reply": "edge_duet.runtime.events",
    "Silence": "edge_duet.runtime.events",
    "TokenDelta": "edge_duet.runtime.events",
    "TurnStarted": "edge_duet.runtime.events",
    "TurnStats": "edge_duet.runtime.events",
    "Evicted": "edge_duet.runtime.events",
}

if TYPE_CHECKING:  # pragma: no cover
    from .runtime.assistant import Assistant, AssistantOptions  # noqa: F401
    from .runtime.events import Evicted, Reply, Silence, TokenDelta, TurnStarted, TurnStats  # noqa: F401
    from .runtime.session import Session, SessionOptions  # noqa: F401
    from .runtime.subscription import Subscription  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edge_duet' has no attribute {name!r}")


__all__ = [
    "__version__", "Assistant", "AssistantBusy", "AssistantClosed", "AssistantOptions", "BundleError", "CheckpointError", "EdgeDuetError", "Evicted",
    "InputError", "Manifest", "ProviderError", "Reply", "Session", "SessionOptions", "Silence", "SourceError",
    "Subscription", "TokenDelta", "TurnStarted", "TurnStats", "ValidationError",
]

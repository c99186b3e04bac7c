"""edge-duet: proactive video assistants (MMDuet2 / Qwen2.5-VL) on edge devices.

Public API::

    from edge_duet import Session, SessionOptions, load_bundle
    session = Session("path/to/bundle")
    session.ask("Tell me when a red circle appears.")
    session.add_frames([frame_bgr_1, frame_bgr_2], t=2.0)
    for event in session.step():
        ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BundleError,
    CheckpointError,
    EdgeDuetError,
    InputError,
    ProviderError,
    SourceError,
    ValidationError,
)
from .manifest import Manifest  # noqa: E402

__all__ = [
    "__version__",
    "BundleError",
    "CheckpointError",
    "EdgeDuetError",
    "InputError",
    "Manifest",
    "ProviderError",
    "SourceError",
    "ValidationError",
]

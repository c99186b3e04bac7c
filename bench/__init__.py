"""``edge_duet.bench``: the measuring tools, kept out of the device runtime. ``edge-duet bench`` (``harness``:
jobs side by side in lockstep, each in its own process; ``edge``: edge-duet's job; ``baseline``: the transformers
loops and the bench's checkpoints; ``peers``: onnxruntime-genai and llama.cpp on the same checkpoint; ``limits``:
the hardware probes and FLOP counts) and ``edge-duet bench --server`` (``streams``: many cameras, one server).

It may import the runtime, export, quant and eval; none of them imports it (pyproject.toml's import contracts)."""

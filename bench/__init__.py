"""``edge_duet.bench``: the measuring tools, kept out of the device runtime. ``edge-duet bench`` is ``run.run`` (a
``BenchRequest`` in, the report out): ``harness`` runs the jobs side by side in lockstep, each in its own process;
``edge`` is edge-duet's job, ``baseline`` the transformers loops (and the bench's checkpoints), ``peers`` and
``peer_worker`` onnxruntime-genai and llama.cpp on the same checkpoint (``gguf_convert`` makes llama.cpp's files);
``limits`` probes the hardware and counts FLOPs; ``report`` makes the ratios, the table and the plot.
``edge-duet bench --server`` is ``streams`` (many cameras, one server).

It may import the runtime, export, quant and eval; none of them imports it (pyproject.toml's import contracts)."""

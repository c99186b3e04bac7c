"""Rebuild the Hugging Face checkpoint of the shipped demo bundle from its ONNX weights.

    python scripts/demo_checkpoint_from_bundle.py OUT_CHECKPOINT [BUNDLE]

The SFT checkpoint behind edge_duet/models/demo (train-demo's stage 3) was not kept; `train-rl` needs one. Every
weight is in the bundle: the vision blocks and norms under their module names, the patch embedding as a
(1176, 128) matrix, the decoder's linear weights as transposed MatMul initializers in layer order (q, k, v, o,
gate, up, down), the tied lm_head. This writes a demo-shaped checkpoint (train-demo's config, tokenizer and
side files), loads those weights into it, and checks the result: exporting it must give the same initializers,
byte for byte, as the bundle (a wrong mapping fails here, not later in training). Demo shape only.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path


def rebuild(out: Path, bundle: Path) -> None:
    import onnx
    import torch
    from onnx import numpy_helper

    from edge_duet.export.checkpoint import load_model
    from edge_duet.train.sft import TrainOptions, init_checkpoint

    init_checkpoint(out, TrainOptions(shape="demo", seed=0))
    if (out / "tokenizer.json").read_text() != (bundle / "tokenizer.json").read_text():
        sys.exit(f"{bundle}'s tokenizer is not train-demo's: not a demo bundle")
    model, _ = load_model(out)
    sd = model.state_dict()

    def inits(name: str) -> dict:
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bundle / f"{name}.onnx")).graph.initializer}

    new = {}
    for k, v in inits("vision").items():
        if k == "patch_weight":
            key = "model.visual.patch_embed.proj.weight"
            new[key] = torch.from_numpy(v.T.copy()).reshape(sd[key].shape)
        elif k.startswith("visual."):
            new["model." + k] = torch.from_numpy(v.copy())
    new["model.language_model.embed_tokens.weight"] = torch.from_numpy(inits("embed")["embed_tokens.weight"].copy())
    dec = inits("decoder")
    for k, v in dec.items():
        if k.startswith("layers.") or k == "norm.weight":
            new["model.language_model." + k] = torch.from_numpy(v.copy())
    mats = sorted((k for k in dec if k.startswith("onnx::MatMul_")), key=lambda s: int(s.rsplit("_", 1)[1]))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    layers = model.config.text_config.num_hidden_layers
    if len(mats) != layers * len(names) + 1:
        sys.exit(f"{len(mats)} MatMul weights in the decoder, expected {layers * len(names) + 1}")
    for i, k in enumerate(mats[:-1]):
        new[f"model.language_model.layers.{i // len(names)}.{names[i % len(names)]}.weight"] = \
            torch.from_numpy(dec[k].T.copy())
    missing = sorted(k for k in sd if k not in new and k != "lm_head.weight")
    if missing:
        sys.exit(f"no bundle weight for {missing}")
    model.load_state_dict({**sd, **new}, strict=True)
    model.save_pretrained(out, safe_serialization=True)


def digests(bundle: Path) -> dict[str, list[str]]:
    import onnx
    from onnx import numpy_helper

    from edge_duet.manifest import GRAPH_NAMES

    return {g: sorted(hashlib.sha256(numpy_helper.to_array(i).tobytes()).hexdigest()
                      for i in onnx.load(str(bundle / f"{g}.onnx")).graph.initializer)
            for g in GRAPH_NAMES}


def main() -> None:
    out = Path(sys.argv[1])
    bundle = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "edge_duet/models/demo"
    rebuild(out, bundle)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["edge-duet", "export", str(out), tmp, "--overwrite", "--name", "check"], check=True,
                       stdout=subprocess.DEVNULL)
        if digests(Path(tmp)) != digests(bundle):
            sys.exit(f"{out} does not export to {bundle}'s weights: the mapping is wrong")
    print(f"{out}: the weights of {bundle}, checked by re-export")


if __name__ == "__main__":
    main()

"""llama.cpp's ``convert_hf_to_gguf.py`` on an edge-duet checkpoint: ``python -m edge_duet.bench.gguf_convert SRC
CHECKPOINT [converter options]`` (SRC: a llama.cpp source tree).

The converter identifies a BPE tokenizer by hashing how it splits a test string, and knows only released
tokenizers; edge-duet's checkpoints (random-weight shapes, the demo model) carry a small byte-level BPE with Qwen's
pre-tokenizer and special tokens. Two facts are declared here instead, and only where the converter cannot find
them itself: the pre-tokenizer is Qwen2's (what ``tokenizer.ggml.pre`` names), and a checkpoint without a
SentencePiece model takes the GPT-2-style BPE path (the converter reaches it when the ``sentencepiece`` package is
installed and finds no ``tokenizer.model``; it is not required here). The bench feeds llama.cpp token ids, never
text, so neither changes what is measured.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    src = Path(argv[0])
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv[1:]]
    sys.path.insert(0, str(src))
    import convert_hf_to_gguf as converter  # its own gguf-py is put on the path by the script
    from conversion import base, qwenvl

    pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return pre(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("edge-duet").warning("BPE pre-tokenizer not among the released ones: declared qwen2")
            return "qwen2"

    def set_vocab(self) -> None:
        if (self.dir_model / "tokenizer.model").is_file():
            self._set_vocab_sentencepiece()
        else:
            self._set_vocab_gpt2()

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    qwenvl.Qwen2VLModel.set_vocab = set_vocab
    converter.main()


if __name__ == "__main__":
    main(sys.argv[1:])

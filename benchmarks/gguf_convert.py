"""Convert a shipped model to GGUF for llama.cpp (the comparison in benchmarks/runtime.py).

The converter is llama.cpp's convert_hf_to_gguf.py, which is not on PyPI: it comes with llama.cpp's
source (with its own gguf-py, which it imports first), e.g. the llama-cpp-python sdist's
vendor/llama.cpp. Its requirements besides torch and transformers: sentencepiece (the `bench` extra).

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/llcpp
    tar -xzf /tmp/llcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llcpp
    export LLAMA_CPP_CONVERTER=/tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
    python benchmarks/gguf_convert.py models/tiny-mixtral /tmp/gguf/tiny-mixtral.f32.gguf --outtype f32

The one thing the converter cannot work out for the shipped models is the pre-tokenizer name it
writes as `tokenizer.ggml.pre`: it names a BPE pre-tokenizer by the hash of the token ids of a fixed
text, from a list of hub models, and stops on any other hash. The shipped tokenizer.json is this
project's own BPE, but its pre-tokenizer is GPT-2's: ByteLevel with use_regex (GPT-2's split
regex), no prefix space, no normalizer, which llama.cpp calls "gpt-2" (LLAMA_VOCAB_PRE_TYPE_GPT2).
So this runs the converter in process with its `TextModel.get_vocab_base_pre` (in its `conversion`
package, as in llama-cpp-python 0.3.36's vendor/llama.cpp) answering "gpt-2" for a tokenizer.json
declaring exactly that pre-tokenizer, and deferring to the hash list otherwise; the converter is
otherwise unchanged. With llama-cpp-python installed, the GGUF's tokenizer is then checked against
tokenizer.json on the held-out text (models/heldout.txt.gz), line by line, special tokens parsed:
with "gpt-2" every line (5544) splits alike, with llama.cpp's "default" 3371 would not.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import runpy
import sys
from pathlib import Path

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
HELDOUT = Path(__file__).resolve().parent.parent / "models" / "heldout.txt.gz"


def is_gpt2_pre_tokenizer(model_dir: Path) -> bool:
    """Whether model_dir's tokenizer.json splits text exactly as GPT-2 does before its BPE."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tok = json.loads(path.read_text())
    pre = tok.get("pre_tokenizer") or {}
    return tok.get("normalizer") is None and all(pre.get(k) == v for k, v in GPT2_PRE_TOKENIZER.items())


def find_converter(converter: str | None) -> Path:
    """convert_hf_to_gguf.py from `converter` or $LLAMA_CPP_CONVERTER; a missing one stops with how to get it."""
    path = converter or os.environ.get("LLAMA_CPP_CONVERTER")
    if not path or not Path(path).is_file():
        sys.exit(f"llama.cpp's convert_hf_to_gguf.py not found ({path or 'set LLAMA_CPP_CONVERTER'}): "
                 "see the docstring of benchmarks/gguf_convert.py for where to get it")
    return Path(path)


def convert(model_dir: Path, outfile: Path, outtype: str, converter: Path) -> None:
    """Run convert_hf_to_gguf.py on model_dir in this process, naming a GPT-2 pre-tokenizer "gpt-2"."""
    sys.path[:0] = [str(converter.parent), str(converter.parent / "gguf-py")]
    from conversion.base import TextModel  # the converter's package, beside the script

    by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        return "gpt-2" if is_gpt2_pre_tokenizer(self.dir_model) else by_hash(self, tokenizer)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    outfile.parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [str(converter), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    runpy.run_path(str(converter), run_name="__main__")


def check_tokenizer(model_dir: Path, gguf: Path) -> int:
    """Lines of the held-out text that the GGUF's tokenizer (llama.cpp) splits differently from tokenizer.json."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    theirs = Llama(str(gguf), vocab_only=True, verbose=False)
    lines = [line for line in gzip.open(HELDOUT, "rt").read().splitlines(keepends=True) if line.strip()]
    return sum(ours.encode(line).ids != theirs.tokenize(line.encode(), add_bos=False, special=True)
               for line in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a model directory (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("outfile", type=Path)
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--converter", help="path of llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER)")
    args = ap.parse_args()
    convert(args.model, args.outfile, args.outtype, find_converter(args.converter))
    if importlib.util.find_spec("llama_cpp") is None:
        return
    if differ := check_tokenizer(args.model, args.outfile):
        sys.exit(f"{args.outfile}: llama.cpp tokenizes {differ} held-out lines differently from tokenizer.json")
    print(f"{args.outfile}: llama.cpp tokenizes the held-out text as tokenizer.json does")


if __name__ == "__main__":
    main()

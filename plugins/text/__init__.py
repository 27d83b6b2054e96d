"""Text, the other side of a contrastive pair: the ``byte_text`` and ``clip_bpe`` tokenizers."""

from ...tokenizers.text import ByteTextTokenizer, ClipBpeTokenizer, find_clip_vocab
from .. import hookimpl


@hookimpl
def register_tokenizers():
    return {"byte_text": ByteTextTokenizer, "clip_bpe": ClipBpeTokenizer}


@hookimpl
def report_environment():
    try:
        return {"open_clip vocab": f"present   {find_clip_vocab()}"}
    except FileNotFoundError:
        return {"open_clip vocab": "missing   for clip_bpe: pip install --no-deps open-clip-torch"}

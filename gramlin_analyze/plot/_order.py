"""Layers in the order of depth, from their names alone.

The store lists layers alphabetically (``fc10`` before ``fc2``, a block's
``attention.output`` before its ``attention.self``). Plots read better in the
order data flows through the model: numbers compare as numbers, and the words
architectures use for their parts are ranked (embeddings first, then within a
block attention before the MLP, query/key/value before the output projection,
pooler and heads last). Names the table does not know keep their natural order.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

__all__ = ["depth_order", "select_layers"]

_DEFAULT = 50
# A segment's rank among its siblings; unknown segments sort naturally at _DEFAULT.
_RANK: dict[str, int] = {
    **dict.fromkeys(
        ("embeddings", "embedding", "embed", "embeds", "emb", "wte", "tok_embeddings"), 0
    ),
    **dict.fromkeys(("embed_tokens", "word_embeddings", "patch_embed", "stem"), 0),
    **dict.fromkeys(("wpe", "position_embeddings", "embed_positions", "pos_embed"), 1),
    "token_type_embeddings": 2,
    "encoder": 20,
    "decoder": 30,
    **dict.fromkeys(("attention", "self_attn", "attn", "self", "sa"), 10),
    **dict.fromkeys(("query", "q_proj", "q", "c_attn", "qkv", "in_proj", "Wqkv"), 11),
    **dict.fromkeys(("key", "k_proj", "k"), 12),
    **dict.fromkeys(("value", "v_proj", "v"), 13),
    **dict.fromkeys(("crossattention", "encoder_attn", "cross_attn"), 15),
    **dict.fromkeys(("intermediate", "mlp", "ffn", "feed_forward", "c_fc", "wi"), 40),
    **dict.fromkeys(("gate_proj", "w1"), 41),
    **dict.fromkeys(("up_proj", "w3"), 42),
    **dict.fromkeys(("output", "o_proj", "out_proj", "c_proj", "down_proj", "wo", "w2"), 80),
    "out": 80,
    "proj": 80,
    "pooler": 90,
    **dict.fromkeys(("classifier", "head", "heads", "lm_head", "score", "readout"), 95),
    "fc": 60,  # a lone ``fc`` follows the convolutions (``fc1``, ``fc2`` are ordinary layers)
}
_PARTS = re.compile(r"(\d+)")


def _natural(segment: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in _PARTS.split(segment) if p)


def _key(name: str) -> tuple:
    return tuple(
        (_RANK.get(seg, _DEFAULT), _natural(seg)) for seg in name.replace("/", ".").split(".")
    )


def depth_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order of depth their names imply (see the module's docstring).

    >>> depth_order(["head", "fc10", "fc2", "emb"])
    ['emb', 'fc2', 'fc10', 'head']
    >>> depth_order(["l.0.attention.output.dense", "l.0.attention.self.query", "l.0.intermediate.dense"])
    ['l.0.attention.self.query', 'l.0.attention.output.dense', 'l.0.intermediate.dense']
    """
    return sorted(names, key=lambda n: (_key(n), n))


def select_layers(available: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """The layers of ``available`` (already in depth order) that ``patterns`` name.

    Patterns are names or shell globs (``bert.encoder.layer.1*``); the result keeps
    the depth order. ``None`` selects every layer.
    """
    if not patterns:
        return list(available)
    unknown = [p for p in patterns if not fnmatch.filter(available, p)]
    if unknown:
        from gramlin_analyze.errors import UsageError

        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise UsageError(f"no layer matches {', '.join(map(repr, unknown))}; layers: {shown}")
    return [n for n in available if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

"""ComfyUI's prompt weights: `(words)` multiplies their weight by 1.1, `(words:1.3)` sets it,
brackets nest, `\\(` and `\\)` are literal brackets (ComfyUI's `comfy/sd1_clip.py`:
`escape_important`, `parse_parentheses`, `token_weights`, `unescape_important`).

The prompt becomes segments (text, weight) with the brackets removed; each segment is
tokenized on its own (so `a (b) c` is tokenized as "a ", "b" and " c", as ComfyUI does) and its
tokens carry its weight. What a weight does is the text encoder's (`weigh`): a weighted token's
embedding moves away from the empty prompt's at its position, z = (z - z_empty) * w + z_empty
(ComfyUI's `ClipTokenWeightEncoder.encode_token_weights`). For FLUX that is T5's sequence
only: CLIP-L gives its pooled vector, which ComfyUI takes unweighted.

Malformed syntax is read as ComfyUI reads it, never refused: an unclosed `(` stays text, a
weight that is not a number (`(word:abc)`) leaves `word:abc` as text at 1.1 times the weight
around it, and a stray `)` stays text.

`plain` is the prompt as written, one segment at weight 1 (diffusers' and BFL's reading, and
mlxflux's before 0.2).
"""

import mlx.core as mx
import numpy as np

SYNTAXES = ("comfy", "plain")
# ComfyUI's escapes: characters no prompt holds stand in for `\)` and `\(` while parsing
_CLOSE, _OPEN = "\0\1", "\0\2"


def segments(prompt: str, syntax: str = "comfy") -> list[tuple[str, float]]:
    """The prompt as (text, weight) segments, in order; `plain`: [(prompt, 1.0)]."""
    if syntax == "plain":
        return [(prompt, 1.0)]
    if syntax != "comfy":
        raise ValueError(f"prompt syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    escaped = prompt.replace("\\)", _CLOSE).replace("\\(", _OPEN)
    return [(_unescape(text), weight) for text, weight in _weights(escaped, 1.0)]


def weighted(prompt: str, syntax: str = "comfy") -> bool:
    """Whether any part of the prompt has a weight other than 1."""
    return any(w != 1.0 for _, w in segments(prompt, syntax))


def _unescape(text: str) -> str:
    return text.replace(_CLOSE, ")").replace(_OPEN, "(")


def _top_level(text: str) -> list[str]:
    """`text` cut into its top-level bracketed groups and the text between them; a `)` that
    closes nothing (the depth goes below zero) stays in the text, as ComfyUI keeps it."""
    parts, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for part in _top_level(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, inner_weight = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass  # `(word:abc)`: the text stays, at 1.1 times the weight
            out += _weights(inner, inner_weight)
        else:
            out.append((part, weight))
    return out


def weigh(z: mx.array, z_empty: mx.array, weights) -> mx.array:
    """Each token's embedding moved from the empty prompt's by its weight (tokens at weight 1
    untouched), in z's dtype as ComfyUI computes it: z [..., N, D], z_empty [..., N, D] (the
    empty prompt at the same length), weights [N]."""
    w = mx.array(np.asarray(weights, dtype=np.float32))[:, None]
    moved = (z - z_empty) * w.astype(z.dtype) + z_empty
    return mx.where(w != 1.0, moved, z)

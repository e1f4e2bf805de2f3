"""Heatmaps of head scores: image files (matplotlib) and the terminal (rich), any profile size.

Layers are rows, heads are columns; the top-k heads are labelled `L{l}H{h}`; KV groups are separated by
vertical lines on GQA models; `diff` draws B - A on a diverging scale centred on zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headprof.artefacts.profile import Profile
from headprof.errors import OutputError
from headprof.files import replace_with

FORMATS = (".png", ".svg", ".pdf")


def grid(profile: Profile, kv: bool, other: Profile | None = None) -> tuple[np.ndarray, int]:
    """The matrix to draw and the group size for separators (1 = none)."""
    a = profile.kv_scores("mean") if kv else profile.query_scores()
    m = profile.model
    uneven = bool(m.get("kv_heads_per_layer") or m.get("query_heads_per_layer"))  # groups differ: no separators
    group = 1 if kv or uneven else profile.model["num_query_heads"] // profile.model["num_kv_heads"]
    if other is not None:
        b = other.kv_scores("mean") if kv else other.query_scores()
        if a.shape != b.shape:
            raise OutputError(f"cannot diff a {a.shape[0]}x{a.shape[1]} profile with a {b.shape[0]}x{b.shape[1]} one")
        a = b - a
    return a, group


def headless(profile: Profile) -> list[int]:
    """Layers drawn as having no heads (a hybrid model's Mamba or linear-attention layers)."""
    return profile.layers_without_heads


def title(profile: Profile, kv: bool, other: Profile | None) -> str:
    m, p = profile.model, profile.probe_set
    level = "KV heads (mean over group)" if kv else "query heads"
    if profile.source and not profile.probes:
        probes = f"imported from {profile.source['file']}"
    else:
        probes = f"{p.get('name', '?')} ({p.get('counted', p.get('count', 0))} of {p.get('count', 0)} probes counted)"
    head = f"{m['spec']}: {profile.method} scores, {level}"
    if other is not None:
        head = f"{other.model['spec']} {other.method} minus {m['spec']} {profile.method}, {level}"
    return f"{head}\n{probes}"


def save_heatmap(profile: Profile, path: Path, kv: bool = False, top: int = 10, other: Profile | None = None,
                 force: bool = True) -> Path:
    """Write a heatmap image; the extension chooses the format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from headprof.files import check_output

    if path.suffix.lower() not in FORMATS:
        raise OutputError(f"unknown image extension '{path.suffix}' (use {', '.join(FORMATS)})")
    check_output(path, force)
    data, group = grid(profile, kv, other)
    layers, heads = data.shape
    width = min(16, max(5, 0.32 * heads + 2.5))
    height = min(14, max(4, 0.26 * layers + 1.8))
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    present = profile.present("kv" if kv else "query")
    shown = np.ma.masked_array(data, mask=~present)  # no head there (a layer without heads, a layer's heads beyond
    # its own count): drawn grey, not as zeros
    if other is not None:
        lim = float(np.abs(data).max()) or 1.0
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
        im = ax.imshow(shown, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    else:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
        im = ax.imshow(shown, cmap=cmap, vmin=0, aspect="auto", interpolation="nearest")
    for layer in headless(profile):
        ax.text(heads / 2 - 0.5, layer, "no attention heads", ha="center", va="center", fontsize=7, color="0.3")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="B - A" if other is not None else "score")
    ax.set_xlabel("KV head" if kv else "query head")
    ax.set_ylabel("layer")
    step = max(1, heads // 16)
    ax.set_xticks(range(0, heads, step))
    ax.set_yticks(range(0, layers, max(1, layers // 16)))
    if group > 1:
        for x in range(group, heads, group):
            ax.axvline(x - 0.5, color="white", linewidth=0.8, alpha=0.7)
    flat = np.abs(data).ravel() if other is not None else data.ravel()
    labelled = [i for i in np.argsort(-flat, kind="stable") if present.ravel()[i]][:top]
    for i in labelled:
        layer, head = divmod(int(i), heads)
        ax.text(head, layer, f"L{layer}H{head}", ha="center", va="center", fontsize=6 if heads > 16 else 7,
                color="black", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))
    import textwrap

    lines = [textwrap.fill(line, width=int(width * 11)) for line in title(profile, kv, other).splitlines()]
    ax.set_title("\n".join(lines), fontsize=9)
    fig.tight_layout()
    try:
        return replace_with(path, fig.savefig)
    finally:
        plt.close(fig)


def terminal_heatmap(profile: Profile, kv: bool = False, top: int = 10, other: Profile | None = None):
    """A rich renderable: one coloured cell per head, the top heads listed underneath."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    data, group = grid(profile, kv, other)
    layers, heads = data.shape
    lim = float(np.abs(data).max()) or 1.0
    shades = " ░▒▓█"
    t = Table(show_header=True, header_style="dim", box=None, padding=0, title=title(profile, kv, other))
    t.add_column("", justify="right", style="dim")
    for h in range(heads):
        t.add_column(str(h % 10) + ("|" if group > 1 and (h + 1) % group == 0 and h + 1 < heads else ""),
                     justify="left")
    none = set(headless(profile))
    present = profile.present("kv" if kv else "query")
    for layer in range(layers):
        if layer in none:
            t.add_row(f"L{layer}", *[Text("··", style="dim") for _ in range(heads)])
            continue
        cells = []
        for h in range(heads):
            v = data[layer, h]
            level = min(len(shades) - 1, int(abs(v) / lim * (len(shades) - 1) + 0.5))
            colour = ("red" if v > 0 else "blue") if other is not None else "green"
            sep = "|" if group > 1 and (h + 1) % group == 0 and h + 1 < heads else ""
            cells.append(Text(shades[level] * 2 + sep, style=colour) if present[layer, h] else Text("··", style="dim"))
        t.add_row(f"L{layer}", *cells)
    flat = np.abs(data).ravel() if other is not None else data.ravel()
    order = [i for i in np.argsort(-flat, kind="stable") if present.ravel()[i]][:top]
    best = [f"L{int(i) // heads}H{int(i) % heads} {data.ravel()[i]:.3g}" for i in order]
    notes = [Text("top: " + ", ".join(best))]
    if none:
        notes.append(Text(f"·· layers without attention heads: {', '.join(map(str, sorted(none)))}", style="dim"))
    return Group(t, *notes)

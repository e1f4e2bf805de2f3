"""What the cache asks of every layer kind: one interface, so that `HeadKVCache` hands work to its layers without
asking what they are (as transformers' `Cache` does with its `CacheLayerMixin`s).

A kind answers, for its layer: whether a method's plan compresses it (`compressible`) and how (`compress`, given
each segment's kept positions), how a batch drops or repeats sequences (`select_rows`), what it holds (`entries`,
`nbytes`, per row of a batch too), what it would hold with no free room (`ideal`), each head's kept prompt tokens
(`kept_counts`, what `run --json` reports as budgets), whether a decode step must make room in it first
(`overflows`, `spare_room`, `grow`), and how attention reads it once compressed (`reads`, `attend`). Layers
headprof leaves to transformers are wrapped by `native.Native`, which answers the same questions for them;
`native.kind_of` is the one place that tells the two apart.
"""

from __future__ import annotations

import torch

from headprof.errors import HeadprofError


class LayerKind:
    """The interface; the defaults are those of a layer that holds every token and compresses nothing."""

    name = "layer"
    compressible = False  # a method's plan selects tokens for this layer at prefill
    max_rows: int | None = None  # sequences a compressed layer of this kind can hold (None: any batch)

    compressed = False  # holds a selection of its prompt tokens (after `compress`)
    sinks = False  # its attention adds a learned sink logit per head (`attend` gets them; only `torch` reads them)

    def compress(self, keep: list[torch.Tensor]) -> None:
        raise HeadprofError(f"a {self.name} layer cannot hold a compressed selection of tokens")

    def select_rows(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the batch's sequences `indices`; the others ended."""
        raise NotImplementedError

    def entries(self) -> int:
        """KV entries (tokens x KV heads) held, every row of the batch."""
        raise NotImplementedError

    def row_entries(self, row: int, batch: int) -> int:
        """KV entries row `row` of a batch of `batch` holds (with its padding, in a layer that pads)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the tensors held for the layer's tokens (keys, values, and any per-slot bookkeeping)."""
        raise NotImplementedError

    def ideal(self, full: int, appended: int, row: int = 0, batch: int = 1) -> int:
        """Entries row `row` would hold with no free room, after `appended` generated tokens; `full` is what the
        model's own layer holds for one sequence."""
        return full

    def kept_counts(self, row: int = 0, batch: int = 1) -> list[int] | None:
        """Prompt tokens each KV head of row `row` kept (None: the layer is not compressed)."""
        return None

    def spare_room(self, q: int, masked: bool | None = None) -> tuple[float, float] | None:
        """For layers that grow their free room together (`HeadKVCache.update`): (spare bytes, bytes per free slot)
        were they grown for `q` new tokens; None for a layer that makes its own room."""
        return None

    def overflows(self, q: int) -> bool:
        return False

    def grow(self, q: int, free: int) -> None:
        """Make room for `q` new tokens and `free` spare slots per head."""

    def reads(self, key: torch.Tensor) -> bool:
        """Whether attention over the keys `update` just returned (`key`) reads this layer itself."""
        return False

    def state_nbytes(self) -> int:
        """Bytes of state the model keeps beside this layer's KV and headprof never compresses (a block layer's
        compressors, DeepSeek-V4): held alike by a compressed cache and the full one, part of `nbytes`."""
        return 0

    def token_rows(self, probs: torch.Tensor) -> torch.Tensor:
        """Prefill rows (batch, heads, queries, keys) over this layer's tokens only: a block layer's rows also cover
        the compressed blocks that follow its tokens."""
        return probs

    def softmax_mask(self) -> torch.Tensor | None:
        """For attention written inline over what `update` just returned: (batch, KV heads, keys) bool, the keys
        each head holds (its softmax must hide the rest: `legacy.InlineRows`); None where it reads everything."""
        return None

    def attend(self, module, query, key, value, attention_mask, scaling: float, softcap: float | None,
               sinks: torch.Tensor | None = None):
        """(output (batch, q, query heads, dim), None) of attention over this compressed layer; `sinks`
        (query heads,): a learned logit per head that joins each row's softmax and reads no value."""
        raise NotImplementedError


"""The full cache: nothing is compressed (the reference every method is measured against)."""

from dataclasses import dataclass

from headprof.methods.base import Method, register


@register
@dataclass
class Full(Method):
    name = "full"
    rank = 0
    summary = "no compression: the model's own full cache"
    compresses = False

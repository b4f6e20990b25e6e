"""Number formats: the reference math of each weight format (fit, round, pack, unpack).

One file per format family; each registers itself with ``@register("format", name)``.
"""

from .base import WeightFormat, format_from_spec, packed_bits_per_weight

__all__ = ["WeightFormat", "format_from_spec", "packed_bits_per_weight"]

"""Disclosure control applied at the aggregation boundary: consistent cell-key
perturbation (``cellkey``), minimum contributors and densification (``threshold``),
dominance rules for magnitude tables (``dominance``) and differential privacy (``dp``)."""

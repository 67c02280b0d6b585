"""Synthetic source exports of a Himeji-sized city (``sekisho synth``).

``generate(out_dir, population, seed, encoding, extract_date)`` writes the six CSV files of
docs/ARCHITECTURE.md section 2 plus ``manifest.json``; see docs/data-dictionary.md for every
column and how it is filled.
"""

from sekisho.synth.generator import DEFAULT_EXTRACT_DATE, DEFAULT_POPULATION, SynthError, generate
from sekisho.synth.output import COLUMNS

__all__ = ["COLUMNS", "DEFAULT_EXTRACT_DATE", "DEFAULT_POPULATION", "SynthError", "generate"]

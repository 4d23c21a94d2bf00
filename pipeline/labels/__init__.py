"""Labels out of a run: regions from maps and masks (``regions``), the one in-memory label type
(``autolabels``), the format writers (``exports``), scoring against truth (``evaluation``) and comparing two
runs (``compare``)."""

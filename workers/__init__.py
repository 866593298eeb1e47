"""hmaopt data plane: checkpoint I/O, layer grouping, merging, evaluation, the search and
the worker that runs it (docs/architecture.md has the map).

Ratio convention: a ratio is the weight on the ALIGNED model,
``merged = base + ratio * (aligned - base)``; 0 is the base model, 1 the aligned one.
"""

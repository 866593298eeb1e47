"""hmaopt data plane: checkpoint I/O, layer grouping, merging (and later evaluation, search).

Ratio convention: a ratio is the weight on the ALIGNED model,
``merged = base + ratio * (aligned - base)``; 0 is the base model, 1 the aligned one.
"""

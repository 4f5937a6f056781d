"""``xoron plan``: per-GPU memory and step-time estimates for every parallel layout a cluster allows.

cluster.py (the machines), memory.py (bytes per rank), cost.py (seconds per step), search.py
(enumerate, validate, rank), writer.py (plan.yaml + ds_config.json), cli.py (the verb).
"""

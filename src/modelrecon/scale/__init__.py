"""Scale-out on a Ray cluster (the optional `scale` extra): capture, dictionary training and graph batches.

Nothing here is imported unless a command is given `--ray` (or a function its `ray=` argument); the single-machine,
offline path never needs Ray. Results go to the same formats, on a shared folder or object storage (storage.py).
"""

"""Scale-out on a Ray cluster (the optional `scale` extra): capture, dictionary training and graph batches.

Nothing here is imported unless a command is given `--ray` (or a function its `ray=` argument); the single-machine,
offline path never needs Ray. Results go to the same formats, on a shared folder or object storage (storage.py).
"""

from modelrecon._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "cluster": ("connect",),
        "capture": ("capture_on_ray",),
        "train": ("train_on_ray",),
        "graphs": ("trace_on_ray", "evaluate_on_ray"),
    },
)

"""CCPCSA: attention-guided channel pruning (Zhao, Luo, Peng, Tan; Electronics 2023).

    from ccpcsa import load_checkpoint
    model = load_checkpoint("runs/search/demo/frontier/<trial>_round3.pt")  # eval-ready

    from ccpcsa import Pruner  # the pruning step (docs/user-guide.md, "Pruning from Python")
"""

__all__ = ["Pruner", "load_checkpoint"]


def __getattr__(name: str):
    # imported on first use, so that `import ccpcsa.models` (or latency, prune) needs only
    # torch, torchvision and torch-pruning, not the storage layer's pyarrow
    if name == "load_checkpoint":
        from ccpcsa.checkpoint import load_checkpoint

        return load_checkpoint
    if name == "Pruner":
        from ccpcsa.pruner import Pruner

        return Pruner
    raise AttributeError(f"module 'ccpcsa' has no attribute {name!r}")

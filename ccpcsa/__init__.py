"""CCPCSA: attention-guided channel pruning (Zhao, Luo, Peng, Tan; Electronics 2023).

    from ccpcsa import load_checkpoint
    model = load_checkpoint("runs/search/demo/frontier/<trial>_round3.pt")  # eval-ready
"""

from ccpcsa.checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]

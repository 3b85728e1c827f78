"""Neural Similarity Learning convolutions (Liu et al., NeurIPS 2019).

``StaticNSLConv2d`` learns one tap-mixing matrix per layer (folds into the
kernel: free at inference via :func:`fold_static_nsl`); ``DynamicNSLConv2d``
predicts it per sample and position with a small meta-network.
"""

from fewshot_nsl.nsl.dynamic import DynamicNSLConv2d, use_pytorch_path
from fewshot_nsl.nsl.static import StaticNSLConv2d, fold_static_nsl

__all__ = ["StaticNSLConv2d", "DynamicNSLConv2d", "fold_static_nsl", "use_pytorch_path"]

"""kuberlhf: the DeepSpeed-Chat RLHF recipe as a Kubernetes-native product.

Importing this package (and ``kuberlhf.contract`` / ``kuberlhf.storage``) must stay light: the operator
imports them and does not ship torch.
"""

__version__ = "0.1.0"

"""The offline side of xnorcam: data, augmentation, the torch mirror of the runtime network, training, export.

``train`` may import ``app``; ``app`` never imports ``train`` or torch.
"""

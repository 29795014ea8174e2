"""Evaluation of xnorcam detectors, off the Pi: dataset readers, metrics, the held-out split, contact sheets.

The layers point one way: ``app`` (the Pi runtime) <- ``evaluation`` <- ``train``.
Nothing here imports torch; pycocotools is imported only where mAP is computed.
``python -m evaluation`` scores a model file through the runtime Detector.
"""

"""xnorcam: real-time binary (XNOR + popcount) object detection for a Raspberry Pi Zero 2 W."""

__version__ = "0.1.0"

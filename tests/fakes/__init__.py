"""Test doubles, each named as a fake: FakeDetector, a fake picamera2 module."""

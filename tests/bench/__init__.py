"""Benchmarks (``make bench``) and the image and HTTP fixtures they share with the tests."""

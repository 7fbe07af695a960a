"""Builders of test data shared by the test modules (image trees, bad-input corpora, learnable toy classes)."""

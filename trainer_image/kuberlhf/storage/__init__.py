"""Checkpoint hand-off through S3-compatible object storage (and file://). No torch here."""

"""Checks that need hardware this project's CI lacks; each writes its findings under ``$OUT``."""

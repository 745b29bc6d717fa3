"""Shared test set-up: this folder is on sys.path, so tests in subfolders can import workflow_copy."""

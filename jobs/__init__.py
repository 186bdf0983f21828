"""Durable job queue on the storage tables, and the worker process that runs registered job kinds.

Knows nothing about quantization: job kinds are plain functions registered by name.
"""

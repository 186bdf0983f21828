"""Persistence: every SQLModel table in `models.py`, the SQLite engine in `db.py`, queries in `crud.py`.

Must not import torch or vllm (a test enforces it): the job worker, CLI and UI all load this.
"""

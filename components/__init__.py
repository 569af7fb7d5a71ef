"""Graft's stage logic: plain, typed Python with no orchestration imports."""

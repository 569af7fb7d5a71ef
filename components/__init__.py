"""Graft's logic, one package per stage; see the README's architecture section."""

"""Pluggable architecture-search strategies (Minitron, MiniPuzzle) and their registry.

Third-party packages add strategies through the `compressor.strategies` entry-point group.
"""

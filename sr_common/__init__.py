"""Shared pieces of both methods: SD 2.1 loading, tiling, colour fix, safe weight files."""

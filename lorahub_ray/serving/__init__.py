"""Hosting composed models for serving, without Ray (what a Ray Serve replica runs)."""

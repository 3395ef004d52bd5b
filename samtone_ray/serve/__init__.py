"""Serving on Ray Serve: the OpenAI-compatible HTTP API, what a replica holds, and the application."""

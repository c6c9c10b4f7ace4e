"""Thin asyncio transports around the sans-I/O handler."""

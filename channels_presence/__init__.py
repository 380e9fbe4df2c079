"""Presence for Django Channels: which sockets and which users are in which rooms."""

__version__ = "2.0.0.dev0"

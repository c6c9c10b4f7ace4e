"""LLMNR (RFC 4795): the responder's pure decision logic; sockets live in net/llmnr.py."""

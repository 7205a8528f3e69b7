"""Decoding on remote I/O servers: config, wire protocol, server and client."""

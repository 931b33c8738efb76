"""Helpers shared by echod's tests: real processes, sockets, load, fake servers."""

"""The server: start-up, the master that supervises, and the workers that echo.

Only ``echod.cli`` imports this package (an import-linter contract says so); it
may use every other package, none of which may use it.
"""

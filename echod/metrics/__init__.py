"""The ``/metrics`` endpoint's own process: rendering and its HTTP loop.

It reads the scoreboard and knows nothing of the server, so a scrape never
loads (or slows) the master or the workers' hot path.
"""

"""Abuse resistance shared by every worker.

A limit on one worker is no limit: a client spreading its connections or
datagrams over the workers would get one allowance each. So the state behind
``max_connections_per_ip`` / ``max_connections_total`` (``conntrack``) and the
UDP rate limits (``ratelimit``) lives in shared memory the master maps before
it forks, and ``admission`` is the check a worker runs at accept. A limit that
is off costs its worker nothing.
"""

"""``echoctl``, one module per verb. It reads only what a running echod publishes
(pidfile, scoreboard, sockets) through the contract modules, never the server."""

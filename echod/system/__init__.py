"""How echod meets the operating system: systemd, daemonizing, dropping privileges."""

"""Generates echod's man pages and shell completions from the code itself.

The argparse parsers (echod.cli, echod.ctl.main) feed argparse-manpage and shtab;
echod.toml(5) is built from the Config dataclass plus the comment blocks of
etc/echod.toml. The output is committed under echod/data/ and a unit test fails
when it drifts: run `make generated` after changing a flag or a config key.
"""

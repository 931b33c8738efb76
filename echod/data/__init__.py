"""Generated man pages (man/) and shell completions (completion/), shipped as package
data. Do not edit: `make generated` rewrites them from the parsers (tools/docgen)."""

"""CLI sub-commands, one module each (see quantkit.cli)."""

"""Cover presets: one TOML file each (data, read when asked for)."""

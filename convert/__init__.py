"""mlxflux.convert: checkpoint files in every layout users have -> an MLX model folder."""
